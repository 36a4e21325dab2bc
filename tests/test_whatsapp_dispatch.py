"""Recording a batch of send results: one UPDATE per kind of move, each row with its own values,
a row that left `sending` meanwhile untouched, and the counters equal to the rows."""

from __future__ import annotations

from datetime import timedelta

import pytest

from app.whatsapp import dispatch
from storage.models import (
    Business, WhatsappBroadcast, WhatsappBroadcastRecipient, counters_from_rows, move_recipients, utc_now,
)
from tests.storage_fixtures import database, migrated_database_url as database_url  # noqa: F401 (fixtures: every test here starts migrated)

Recipient = WhatsappBroadcastRecipient


@pytest.fixture
def claimed(database):
    """Seven recipients of a running broadcast, all claimed by one worker, whose requests have started."""
    broadcast_id, rows = claimed_by_one_worker(7)
    assert dispatch.mark_sending(broadcast_id, [r.recipient_id for r in rows], "worker-1") == {
        r.recipient_id for r in rows}
    return broadcast_id, rows


def claimed_by_one_worker(count: int) -> tuple[int, list[dispatch.ClaimedRecipient]]:
    """A running broadcast of `count` recipients, every one claimed by worker-1."""
    business = Business.create(name="Acme")
    broadcast = WhatsappBroadcast.create(business=business, name="spring", message_type="text",
                                         message_text="שלום", total_recipients=count)
    Recipient.insert_many([{"broadcast": broadcast.id, "business": business.id, "phone": f"+97250234560{index}"}
                           for index in range(count)]).execute()
    dispatch.start(broadcast.id, 0.0, utc_now())
    rows = dispatch.claim(broadcast.id, "worker-1", 10, 30.0, utc_now())
    assert len(rows) == count
    return broadcast.id, rows


def row(claimed_recipient: dispatch.ClaimedRecipient) -> WhatsappBroadcastRecipient:
    return Recipient.get_by_id(claimed_recipient.recipient_id)


def test_a_mixed_batch_moves_every_row_with_its_own_values(claimed):
    broadcast_id, rows = claimed
    now = utc_now().replace(microsecond=123000)
    results = [
        dispatch.sent(rows[0], "wamid.first", now),
        dispatch.sent(rows[1], "wamid.second", now + timedelta(seconds=1)),
        dispatch.retry(rows[2], 130429, "(#130429) Rate limit hit", now, now + timedelta(seconds=5)),
        dispatch.retry(rows[3], None, "not sent: no connection", now, now + timedelta(seconds=9)),
        dispatch.released(rows[4], from_sending=True),
        dispatch.failed(rows[5], 131026, "(#131026) Message Undeliverable.", now + timedelta(seconds=2)),
        dispatch.unknown(rows[6], "no answer within 10 s", now + timedelta(seconds=3)),
    ]
    assert dispatch.record_results(broadcast_id, results) == 7

    first, second, throttled, unreachable, released, undeliverable, unanswered = (row(claimed) for claimed in rows)
    assert (first.status, first.message_id, first.sent_at) == ("sent", "wamid.first", now)
    assert (second.status, second.message_id, second.sent_at) == ("sent", "wamid.second", now + timedelta(seconds=1))
    assert (throttled.status, throttled.error_code, throttled.next_attempt_at, throttled.attempts) == (
        "queued", 130429, now + timedelta(seconds=5), 1)
    assert (unreachable.error_code, unreachable.error_message, unreachable.next_attempt_at) == (
        None, "not sent: no connection", now + timedelta(seconds=9))
    assert (released.status, released.attempts, released.next_attempt_at) == ("queued", 0, None)
    assert (undeliverable.status, undeliverable.error_code, undeliverable.error_at) == (
        "failed", 131026, now + timedelta(seconds=2))
    assert (unanswered.status, unanswered.error_message, unanswered.error_at) == (
        "unknown", "no answer within 10 s", now + timedelta(seconds=3))
    assert (first.error_at, throttled.error_at, released.error_at) == (None, now, None)
    assert all(claimed_row.claimed_by is None and claimed_row.lease_expires_at is None
               for claimed_row in map(row, rows))
    broadcast = WhatsappBroadcast.get_by_id(broadcast_id)
    assert {name: getattr(broadcast, name) for name in counters_from_rows(broadcast_id)} == counters_from_rows(
        broadcast_id)


def test_a_row_whose_lease_expired_meanwhile_stays_unknown(claimed):
    broadcast_id, rows = claimed
    move_recipients(broadcast_id, "sending", "unknown", Recipient.id == rows[0].recipient_id)
    moved = dispatch.record_results(broadcast_id, [dispatch.sent(claimed_row, f"wamid.{index}", utc_now())
                                                   for index, claimed_row in enumerate(rows)])
    assert moved == 6
    assert (row(rows[0]).status, row(rows[0]).message_id) == ("unknown", None)
    assert row(rows[1]).message_id == "wamid.1"
    broadcast = WhatsappBroadcast.get_by_id(broadcast_id)
    assert (broadcast.sent_count, broadcast.unknown_count) == (6, 1)
    assert {name: getattr(broadcast, name) for name in counters_from_rows(broadcast_id)} == counters_from_rows(
        broadcast_id)


def test_a_row_is_sending_only_once_its_own_worker_starts_its_request(database):
    broadcast_id, (first, second, third) = claimed_by_one_worker(3)
    assert {row(claimed_row).status for claimed_row in (first, second, third)} == {"claimed"}
    assert dispatch.mark_sending(broadcast_id, [first.recipient_id], "worker-2") == set()  # another's claim
    assert row(first).status == "claimed"
    assert dispatch.mark_sending(broadcast_id, [first.recipient_id], "worker-1") == {first.recipient_id}
    assert row(first).status == "sending"
    assert dispatch.mark_sending(broadcast_id, [first.recipient_id], "worker-2") == set()  # sending in another's name
    # A claim released before its request started leaves `claimed`; a `sending` row is not touched by it.
    assert dispatch.record_results(broadcast_id, [dispatch.released(second), dispatch.released(first)]) == 1
    assert (row(second).status, row(second).attempts, row(second).claimed_by) == ("queued", 0, None)
    assert row(first).status == "sending"
    # The lease runs out: the row whose request started may have gone out, the other never did.
    assert dispatch.expire_leases(broadcast_id, utc_now() + timedelta(seconds=60)) == 1
    assert (row(first).status, row(first).claimed_by) == ("unknown", None)
    assert (row(third).status, row(third).attempts, row(third).claimed_by, row(third).lease_expires_at) == (
        "queued", 0, None, None)
    assert dispatch.mark_sending(broadcast_id, [third.recipient_id], "worker-1") == set()  # claim gone: no request
    assert dispatch.seconds_until_next_due(broadcast_id, utc_now()) == 0.0
    broadcast = WhatsappBroadcast.get_by_id(broadcast_id)
    assert {name: getattr(broadcast, name) for name in counters_from_rows(broadcast_id)} == counters_from_rows(
        broadcast_id)
