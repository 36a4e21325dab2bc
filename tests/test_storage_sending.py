"""Migrations 0006 and 0007 and the sending columns: leases, shared send slots, counters that equal
the rows, and error times."""

from __future__ import annotations

import threading

import pytest

from storage.migrate import apply_migrations, load_migrations
from storage.models import (
    Business,
    WhatsappBroadcast,
    WhatsappBroadcastRecipient,
    counter_changes,
    counters_from_rows,
    move_recipients,
    utc_now,
)
from tests.storage_fixtures import create_legacy_tables, database, database_url  # noqa: F401 (fixtures)

BEFORE_SENDING = [migration for migration in load_migrations() if migration.id < 6]
CLAIM_INDEX = ["broadcast_id", "status", "lease_expires_at"]
PHONES = [f"+97250234{number:04d}" for number in range(40)]


def index_columns(database, table: str) -> list[list[str]]:
    return sorted(index.columns for index in database.get_indexes(table))


def create_broadcast(phones: list[str]) -> WhatsappBroadcast:
    business = Business.create(name="מספרת דנה")
    broadcast = WhatsappBroadcast.create(business=business, name="מבצע אביב", total_recipients=len(phones))
    WhatsappBroadcastRecipient.insert_many(
        [{"broadcast": broadcast, "business": business, "phone": phone} for phone in phones]
    ).execute()
    return broadcast


def stored_counters(broadcast_id: int) -> dict[str, int]:
    broadcast = WhatsappBroadcast.get_by_id(broadcast_id)
    return {counter: getattr(broadcast, counter) for counter in counters_from_rows(broadcast_id)}


def test_an_upgrade_from_0005_keeps_rows_and_starts_the_new_counters_equal_to_them(database):
    apply_migrations(database, migrations=BEFORE_SENDING)
    database.execute_sql("INSERT INTO businesses (id, name, created_at) VALUES (1, 'Acme', '2025-01-02 03:04:05')")
    database.execute_sql(
        "INSERT INTO whatsapp_broadcasts (id, business_id, name, status, sent_count, created_at) "
        "VALUES (1, 1, 'Launch', 'completed', 3, '2025-01-02 03:04:05')"
    )
    for phone, status in [("+15550001111", "delivered"), ("+15550001112", "read"), ("+15550001113", "unknown"),
                          ("+15550001114", "sent")]:
        database.execute_sql(
            "INSERT INTO whatsapp_broadcast_recipients (broadcast_id, business_id, phone, status, created_at) "
            f"VALUES (1, 1, '{phone}', '{status}', '2025-01-02 03:04:05')"
        )

    assert [outcome.name for outcome in apply_migrations(database)] == [
        migration.name for migration in load_migrations()[len(BEFORE_SENDING):]]

    broadcast = WhatsappBroadcast.get_by_id(1)
    assert (broadcast.name, broadcast.status, broadcast.sent_count, broadcast.failed_count) == (
        "Launch", "completed", 3, 0
    )
    assert (broadcast.delivered_count, broadcast.read_count, broadcast.unknown_count) == (2, 1, 1)
    assert stored_counters(1) == counters_from_rows(1)
    recipient = WhatsappBroadcastRecipient.get(WhatsappBroadcastRecipient.phone == "+15550001111")
    assert (recipient.status, recipient.name, recipient.claimed_by, recipient.lease_expires_at) == (
        "delivered", None, None, None
    )


def test_the_claim_index_replaces_the_status_index(database):
    apply_migrations(database)

    recipient_indexes = index_columns(database, "whatsapp_broadcast_recipients")
    assert CLAIM_INDEX in recipient_indexes
    assert ["broadcast_id", "status"] not in recipient_indexes
    assert ["message_id"] in recipient_indexes


def test_an_upgrade_from_0006_keeps_failed_rows_untimed_and_indexes_errors_by_time(database):
    apply_migrations(database, migrations=[migration for migration in load_migrations() if migration.id < 7])
    broadcast = create_broadcast(PHONES[:2])
    database.execute_sql("UPDATE whatsapp_broadcast_recipients SET status = 'failed', error_code = 131026, "
                         "error_message = 'Message undeliverable'")

    assert [outcome.name for outcome in apply_migrations(
        database, migrations=[migration for migration in load_migrations() if migration.id < 8])] == [
        "0007_recipient_error_time"]

    rows = WhatsappBroadcastRecipient.select().where(WhatsappBroadcastRecipient.broadcast == broadcast.id)
    assert [(row.status, row.error_code, row.error_at) for row in rows] == [("failed", 131026, None)] * 2
    assert ["broadcast_id", "error_at"] in index_columns(database, "whatsapp_broadcast_recipients")


def test_an_adopted_legacy_database_gets_the_indexes_its_old_system_never_made(database):
    create_legacy_tables(database, with_recipients=True)
    apply_migrations(database)

    assert CLAIM_INDEX in index_columns(database, "whatsapp_broadcast_recipients")
    assert ["message_id"] in index_columns(database, "whatsapp_broadcast_recipients")
    assert ["status"] in index_columns(database, "whatsapp_broadcasts")
    assert stored_counters(3) == {**counters_from_rows(3), "sent_count": 2}
    assert counters_from_rows(3)["sent_count"] == 2


def test_the_sending_columns_round_trip(database):
    apply_migrations(database)
    broadcast = create_broadcast(PHONES[:1])
    slot_at = utc_now()
    WhatsappBroadcast.update(
        template_language="he", rate_per_second=2.5, send_slot_at=slot_at, paused_reason="token expired (190)"
    ).where(WhatsappBroadcast.id == broadcast.id).execute()
    WhatsappBroadcastRecipient.update(
        name="דנה", claimed_by="worker-1", lease_expires_at=slot_at, error_code=131026
    ).execute()

    stored = WhatsappBroadcast.get_by_id(broadcast.id)
    assert (stored.template_language, stored.rate_per_second, stored.send_slot_at, stored.paused_reason) == (
        "he", 2.5, slot_at, "token expired (190)"
    )
    recipient = stored.recipients.get()
    assert (recipient.name, recipient.claimed_by, recipient.lease_expires_at, recipient.error_code) == (
        "דנה", "worker-1", slot_at, 131026
    )


@pytest.mark.parametrize(
    "from_status, to_status, expected",
    [
        ("sending", "sent", {"sent_count": 1}),
        ("sent", "read", {"delivered_count": 1, "read_count": 1}),
        ("sent", "failed", {"sent_count": -1, "failed_count": 1}),
        ("unknown", "sending", {"unknown_count": -1}),
        ("queued", "sending", {}),
    ],
)
def test_counter_changes_follow_the_funnel(from_status, to_status, expected):
    assert counter_changes(from_status, to_status) == expected


def test_moving_recipients_moves_the_counters_and_only_rows_still_in_the_old_status(database):
    apply_migrations(database)
    broadcast = create_broadcast(PHONES[:3])
    recipient = WhatsappBroadcastRecipient
    first, second, third = [row.id for row in broadcast.recipients.order_by(recipient.id)]

    assert move_recipients(broadcast.id, "queued", "sending", claimed_by="worker-1") == 3
    sent_now = recipient.id.in_([first, second])
    assert move_recipients(broadcast.id, "sending", "sent", sent_now, message_id="wamid.A") == 2
    assert move_recipients(broadcast.id, "sending", "sent", recipient.id == first) == 0
    assert move_recipients(broadcast.id, "sent", "read", recipient.id == first) == 1
    assert move_recipients(broadcast.id, "sending", "unknown", recipient.id == third) == 1

    assert stored_counters(broadcast.id) == counters_from_rows(broadcast.id) == {
        "sent_count": 2, "delivered_count": 1, "read_count": 1, "failed_count": 0, "unknown_count": 1,
    }


def test_counters_stay_exact_when_workers_race_on_the_same_rows(database):
    apply_migrations(database)
    broadcast = create_broadcast(PHONES)
    recipient_ids = [row.id for row in broadcast.recipients]
    moved_counts = []

    def deliver_all() -> None:
        moved = 0
        for recipient_id in recipient_ids:
            moved += move_recipients(broadcast.id, "queued", "sent", WhatsappBroadcastRecipient.id == recipient_id)
            moved += move_recipients(broadcast.id, "sent", "delivered", WhatsappBroadcastRecipient.id == recipient_id)
        moved_counts.append(moved)
        database.close()

    workers = [threading.Thread(target=deliver_all) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()

    assert sum(moved_counts) == 2 * len(PHONES)
    assert stored_counters(broadcast.id) == counters_from_rows(broadcast.id)
    assert counters_from_rows(broadcast.id)["delivered_count"] == len(PHONES)
