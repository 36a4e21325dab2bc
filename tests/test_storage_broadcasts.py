"""The WhatsApp broadcast schema: defaults, one row per phone per broadcast, cascading deletes."""

from __future__ import annotations

import peewee
import pytest

from storage.migrate import apply_migrations
from storage.models import Business, WhatsappBroadcast, WhatsappBroadcastRecipient
from tests.storage_fixtures import database, database_url  # noqa: F401 (fixtures)

PHONES = ["+972501234567", "+972521234567", "+15550001111"]


@pytest.fixture
def migrated(database):
    apply_migrations(database)
    return database


def create_broadcast(name: str, phones: list[str]) -> WhatsappBroadcast:
    business = Business.create(name="מספרת דנה")
    broadcast = WhatsappBroadcast.create(
        business=business, name=name, template_name="spring_sale",
        audience_filter={"tags": ["vip", "לקוחות"], "min_visits": 2}, total_recipients=len(phones),
    )
    for phone in phones:
        WhatsappBroadcastRecipient.create(broadcast=broadcast, business=business, phone=phone)
    return broadcast


def test_a_broadcast_and_its_recipients_round_trip(migrated):
    broadcast = create_broadcast("מבצע אביב", PHONES)

    stored = WhatsappBroadcast.get_by_id(broadcast.id)
    assert (stored.name, stored.status, stored.sent_count) == ("מבצע אביב", "pending", 0)
    assert stored.audience_filter == {"tags": ["vip", "לקוחות"], "min_visits": 2}
    recipients = stored.recipients.order_by(WhatsappBroadcastRecipient.id)
    assert [(recipient.phone, recipient.status, recipient.attempts) for recipient in recipients] == [
        (phone, "queued", 0) for phone in PHONES
    ]


def test_rows_inserted_without_the_models_get_the_database_defaults(migrated):
    migrated.execute_sql("INSERT INTO businesses (id, name, created_at) VALUES (1, 'Acme', '2025-01-02 03:04:05')")
    migrated.execute_sql(
        "INSERT INTO whatsapp_broadcasts (id, business_id, name, created_at) VALUES (1, 1, 'B', '2025-01-02 03:04:05')"
    )
    migrated.execute_sql(
        "INSERT INTO whatsapp_broadcast_recipients (broadcast_id, business_id, phone, created_at) "
        "VALUES (1, 1, '+15550001111', '2025-01-02 03:04:05')"
    )

    broadcast = WhatsappBroadcast.get_by_id(1)
    assert (broadcast.status, broadcast.total_recipients, broadcast.provider, broadcast.message_type) == (
        "pending", 0, "meta", "template"
    )
    recipient = broadcast.recipients.get()
    assert (recipient.status, recipient.attempts, recipient.message_id) == ("queued", 0, None)


def test_the_same_phone_twice_in_one_broadcast_is_refused(migrated):
    broadcast = create_broadcast("First", PHONES[:1])
    other = create_broadcast("Second", PHONES[:1])

    with pytest.raises(peewee.IntegrityError), migrated.atomic():
        WhatsappBroadcastRecipient.create(broadcast=broadcast, business=broadcast.business, phone=PHONES[0])

    assert broadcast.recipients.count() == 1
    assert other.recipients.count() == 1


def test_deleting_a_broadcast_deletes_only_its_recipients(migrated):
    doomed = create_broadcast("Doomed", PHONES)
    kept = create_broadcast("Kept", PHONES[:2])

    WhatsappBroadcast.delete().where(WhatsappBroadcast.id == doomed.id).execute()

    assert WhatsappBroadcastRecipient.select().where(WhatsappBroadcastRecipient.broadcast == doomed.id).count() == 0
    assert [recipient.phone for recipient in kept.recipients.order_by(WhatsappBroadcastRecipient.id)] == PHONES[:2]


def test_a_recipient_of_a_missing_broadcast_is_refused(migrated):
    business = Business.create(name="Acme")

    with pytest.raises(peewee.IntegrityError), migrated.atomic():
        WhatsappBroadcastRecipient.create(broadcast=999, business=business, phone=PHONES[0])
