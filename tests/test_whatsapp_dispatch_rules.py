"""Each dispatch rule on its own, against the database: starting, claiming with send slots, leases,
pausing, the wait until the next due row, and finishing. Two broadcasts share the tables each time,
so a rule that forgets which broadcast it is about shows up."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta

import pytest

from app.whatsapp import dispatch
from app.whatsapp.cloud_api import template_message, text_message
from storage.models import Business, WhatsappBroadcast, WhatsappBroadcastRecipient, recipient_status_counts
from tests.storage_fixtures import database, migrated_database_url as database_url  # noqa: F401 (fixtures: every test here starts migrated)

Recipient = WhatsappBroadcastRecipient
NOW = datetime(2026, 5, 1, 9, 0, 0)


@pytest.fixture
def broadcasts(database):
    """Two broadcasts of four recipients each: a text one and a template one, both pending."""
    business = Business.create(name="Acme")
    made = []
    for number, fields in enumerate([{"message_type": "text", "message_text": "שלום"},
                                     {"template_name": "spring_sale", "template_language": "he"}]):
        broadcast = WhatsappBroadcast.create(business=business, name=f"b{number}", total_recipients=4, **fields)
        Recipient.insert_many([{"broadcast": broadcast.id, "business": business.id,
                                "phone": f"+9725023456{number}{index}"} for index in range(4)]).execute()
        made.append(broadcast.id)
    return made


def statuses(broadcast_id: int) -> dict[str, int]:
    return {status: count for status, count in recipient_status_counts(broadcast_id).items() if count}


def test_start_runs_a_pending_broadcast_at_its_rate_and_keeps_when_it_first_started(broadcasts):
    first, second = broadcasts
    assert dispatch.start(first, 5.0, NOW) == "running"
    assert dispatch.start(first, 8.0, NOW + timedelta(hours=1)) == "running"
    broadcast = WhatsappBroadcast.get_by_id(first)
    assert (broadcast.rate_per_second, broadcast.started_at, broadcast.completed_at) == (8.0, NOW, None)
    assert dispatch.status_of(second) == "pending"
    assert dispatch.status_of(999) == "missing"
    assert dispatch.running_broadcast_ids() == [first]
    dispatch.start(second, 5.0, NOW)
    assert dispatch.running_broadcast_ids() == [first, second]


@pytest.mark.parametrize("finished", ["partial", "failed"])
def test_a_finished_broadcast_starts_again_only_to_resend_unknown_outcomes(broadcasts, finished):
    first, _ = broadcasts
    WhatsappBroadcast.update(status=finished, completed_at=NOW).where(WhatsappBroadcast.id == first).execute()
    assert dispatch.start(first, 5.0, NOW) == finished
    assert dispatch.start(first, 5.0, NOW, reopen=True) == "running"
    assert WhatsappBroadcast.get_by_id(first).completed_at is None
    WhatsappBroadcast.update(status="cancelled").where(WhatsappBroadcast.id == first).execute()
    assert dispatch.start(first, 5.0, NOW, reopen=True) == "cancelled"


def test_a_claim_reserves_evenly_spaced_slots_and_leases_past_the_last(broadcasts):
    first, second = broadcasts
    dispatch.start(first, 4.0, NOW)
    dispatch.start(second, 4.0, NOW)
    claimed = dispatch.claim(first, "worker-1", 3, 30.0, NOW)
    slot = NOW + dispatch.SLOT_LEAD
    assert [(c.broadcast_id, c.phone, c.attempts, c.send_at) for c in claimed] == [
        (first, f"+97250234560{index}", 1, slot + index * timedelta(seconds=0.25)) for index in range(3)]
    lease_ends = slot + timedelta(seconds=0.75 + 30.0)
    assert {c.lease_expires_at for c in claimed} == {lease_ends}
    assert [c.body for c in claimed] == [text_message(f"+97250234560{index}", "שלום") for index in range(3)]
    rows = list(Recipient.select().where(Recipient.broadcast == first).order_by(Recipient.id))
    assert [(r.status, r.claimed_by, r.attempts, r.lease_expires_at) for r in rows] == [
        ("claimed", "worker-1", 1, lease_ends)] * 3 + [("queued", None, 0, None)]
    assert WhatsappBroadcast.get_by_id(first).send_slot_at == slot + timedelta(seconds=0.75)
    assert statuses(second) == {"queued": 4}
    # The next claim, by any worker, takes the slots after these.
    later = dispatch.claim(first, "worker-2", 3, 30.0, NOW)
    assert [(c.phone, c.send_at) for c in later] == [("+972502345603", slot + timedelta(seconds=0.75))]
    assert dispatch.claim(first, "worker-2", 3, 30.0, NOW) == []
    templated = dispatch.claim(second, "worker-1", 1, 30.0, NOW)
    assert templated[0].body == template_message("+972502345610", "spring_sale", "he")
    assert templated[0].send_at == slot  # each broadcast keeps its own schedule


def test_an_unlimited_rate_sends_every_claim_at_once(broadcasts):
    first, _ = broadcasts
    dispatch.start(first, 0.0, NOW)
    claimed = dispatch.claim(first, "worker-1", 10, 30.0, NOW)
    assert {c.send_at for c in claimed} == {NOW + dispatch.SLOT_LEAD} and len(claimed) == 4


def test_only_due_queued_recipients_of_a_running_broadcast_are_claimed(broadcasts):
    first, second = broadcasts
    assert dispatch.claim(first, "worker-1", 10, 30.0, NOW) == []  # pending
    dispatch.start(first, 0.0, NOW)
    ids = [r.id for r in Recipient.select().where(Recipient.broadcast == first).order_by(Recipient.id)]
    Recipient.update(next_attempt_at=NOW + timedelta(seconds=1)).where(Recipient.id == ids[0]).execute()
    Recipient.update(next_attempt_at=NOW).where(Recipient.id == ids[1]).execute()
    Recipient.update(status="failed").where(Recipient.id == ids[2]).execute()
    assert [c.recipient_id for c in dispatch.claim(first, "worker-1", 10, 30.0, NOW)] == [ids[1], ids[3]]
    assert [c.recipient_id for c in dispatch.claim(first, "worker-1", 10, 30.0, NOW + timedelta(seconds=1))] == [
        ids[0]]
    assert statuses(second) == {"queued": 4}


def test_an_expired_lease_leaves_its_started_rows_unknown_its_unstarted_ones_queued(broadcasts):
    first, second = broadcasts
    for broadcast_id in broadcasts:
        dispatch.start(broadcast_id, 0.0, NOW)
        claimed = dispatch.claim(broadcast_id, "worker-1", 3, 10.0, NOW)
        assert len(dispatch.mark_sending(broadcast_id, [r.recipient_id for r in claimed[:2]], "worker-1")) == 2
    lease_ends = NOW + dispatch.SLOT_LEAD + timedelta(seconds=10.0)
    assert dispatch.expire_leases(first, lease_ends) == 0  # not yet
    assert statuses(first) == {"sending": 2, "claimed": 1, "queued": 1}
    after = lease_ends + timedelta(seconds=1)
    assert dispatch.expire_leases(first, after) == 2
    lost = list(Recipient.select().where(Recipient.broadcast == first, Recipient.status == "unknown"))
    assert [(r.claimed_by, r.error_message, r.error_at) for r in lost] == [
        (None, "worker lost while sending; it may have been sent", after)] * 2
    assert [(r.claimed_by, r.lease_expires_at, r.attempts) for r in Recipient.select().where(
        Recipient.broadcast == first, Recipient.status == "queued")] == [(None, None, 0)] * 2
    assert statuses(second) == {"sending": 2, "claimed": 1, "queued": 1}
    Recipient.update(next_attempt_at=NOW).where(Recipient.status == "unknown").execute()
    assert dispatch.requeue_unknown(first) == 2
    assert statuses(first) == {"queued": 4}
    assert Recipient.select().where(Recipient.broadcast == first, Recipient.next_attempt_at.is_null(False)).count() == 0
    assert statuses(second) == {"sending": 2, "claimed": 1, "queued": 1}


def test_pause_stops_only_that_running_broadcast(broadcasts):
    first, second = broadcasts
    dispatch.start(first, 0.0, NOW)
    dispatch.start(second, 0.0, NOW)
    dispatch.pause(first, "access token refused")
    assert [(b.status, b.paused_reason) for b in WhatsappBroadcast.select().order_by(WhatsappBroadcast.id)] == [
        ("paused", "access token refused"), ("running", None)]
    WhatsappBroadcast.update(status="cancelled").where(WhatsappBroadcast.id == second).execute()
    dispatch.pause(second, "too late")
    assert dispatch.status_of(second) == "cancelled"


def test_the_wait_for_the_next_due_recipient(broadcasts):
    first, second = broadcasts
    dispatch.start(first, 0.0, NOW)
    assert dispatch.seconds_until_next_due(first, NOW) == 0.0  # queued and due now
    Recipient.update(next_attempt_at=NOW + timedelta(seconds=7)).where(Recipient.broadcast == first).execute()
    Recipient.update(next_attempt_at=NOW + timedelta(seconds=2)).where(Recipient.broadcast == second).execute()
    assert dispatch.seconds_until_next_due(first, NOW) == 7.0
    assert dispatch.seconds_until_next_due(first, NOW + timedelta(seconds=9)) == 0.0
    Recipient.update(status="failed").where(Recipient.broadcast == first).execute()
    assert dispatch.seconds_until_next_due(first, NOW) is None  # nothing left
    Recipient.update(status="claimed").where(Recipient.broadcast == first).execute()
    assert dispatch.seconds_until_next_due(first, NOW) == 0.0  # claimed: sent soon, or queued again
    Recipient.update(status="sending").where(Recipient.broadcast == first).execute()
    assert dispatch.seconds_until_next_due(first, NOW) == 0.0  # in flight: look again soon


@pytest.mark.parametrize("outcome, final", [
    ({"sent": 2, "delivered": 1, "read": 1}, "completed"),
    ({"read": 1, "failed": 3}, "partial"),
    ({"delivered": 1, "unknown": 3}, "partial"),
    ({"failed": 2, "unknown": 2}, "failed"),
])
def test_finish_names_the_outcome_for_that_broadcast_only(broadcasts, outcome, final):
    first, second = broadcasts
    dispatch.start(first, 0.0, NOW)
    dispatch.start(second, 0.0, NOW)
    ids = [r.id for r in Recipient.select().where(Recipient.broadcast == first).order_by(Recipient.id)]
    statuses_in_order = [status for status, count in outcome.items() for _ in range(count)]
    for recipient_id, status in zip(ids, statuses_in_order):
        Recipient.update(status=status).where(Recipient.id == recipient_id).execute()
    assert dispatch.finish(first, NOW) == final
    assert WhatsappBroadcast.get_by_id(first).completed_at == NOW
    assert dispatch.status_of(second) == "running"
    assert dispatch.finish(first, NOW + timedelta(hours=1)) == final  # only a running broadcast finishes
    assert WhatsappBroadcast.get_by_id(first).completed_at == NOW


@pytest.mark.parametrize("outcome, final", [
    ({"sent": 1, "read": 1, "failed": 2}, "partial"),
    ({"sent": 1, "delivered": 1, "failed": 2}, "partial"),
])
def test_finish_counts_every_reached_recipient(broadcasts, outcome, final):
    test_finish_names_the_outcome_for_that_broadcast_only(broadcasts, outcome, final)


def test_recorded_results_move_that_broadcasts_counters_only(broadcasts):
    first, second = broadcasts
    for broadcast_id in broadcasts:
        dispatch.start(broadcast_id, 0.0, NOW)
    claimed = dispatch.claim(first, "worker-1", 3, 30.0, NOW)
    dispatch.claim(second, "worker-1", 3, 30.0, NOW)
    assert len(dispatch.mark_sending(first, [r.recipient_id for r in claimed], "worker-1")) == 3
    results = [dispatch.sent(claimed[0], "wamid.1", NOW), dispatch.failed(claimed[1], 131026, "undeliverable", NOW),
               dispatch.unknown(claimed[2], "no answer", NOW)]
    assert dispatch.record_results(first, results) == 3
    counters = ["sent_count", "failed_count", "unknown_count"]
    assert [[getattr(b, name) for name in counters] for b in WhatsappBroadcast.select().order_by(WhatsappBroadcast.id)] == [
        [1, 1, 1], [0, 0, 0]]


def test_a_failed_row_with_a_retry_time_is_not_waited_for(broadcasts):
    first, _ = broadcasts
    dispatch.start(first, 0.0, NOW)
    ids = [r.id for r in Recipient.select().where(Recipient.broadcast == first).order_by(Recipient.id)]
    Recipient.update(next_attempt_at=NOW + timedelta(seconds=5)).where(Recipient.broadcast == first).execute()
    Recipient.update(status="failed", next_attempt_at=NOW + timedelta(seconds=1)).where(Recipient.id == ids[0]).execute()
    assert dispatch.seconds_until_next_due(first, NOW) == 5.0


@pytest.mark.parametrize("rate, unlimited", [(0.0, True), (float("inf"), True), (0.5, False), (1.0, False), (80.0, False)])
def test_a_rate_of_zero_or_infinity_means_no_limit(rate, unlimited):
    assert dispatch.unlimited(rate) is unlimited


def test_workers_claiming_at_once_each_get_other_recipients_and_none_fails(database):
    business = Business.create(name="Acme")
    broadcast = WhatsappBroadcast.create(business=business, name="rush", message_type="text", message_text="hi",
                                         total_recipients=40)
    Recipient.insert_many([{"broadcast": broadcast.id, "business": business.id, "phone": f"+9725023{index:05d}"}
                           for index in range(40)]).execute()
    dispatch.start(broadcast.id, 0.0, NOW)
    start_together = threading.Barrier(4)
    claimed: list[list[int]] = [[] for _ in range(4)]
    left_when_done = [None] * 4
    errors = []

    def work(number: int) -> None:
        try:
            start_together.wait()
            while batch := dispatch.claim(broadcast.id, f"worker-{number}", 2, 30.0, NOW):
                claimed[number].extend(c.recipient_id for c in batch)
            # A claim waits for the broadcast's row: coming back empty means nobody is left, not "busy".
            left_when_done[number] = Recipient.select().where(Recipient.status == "queued").count()
        except Exception as error:  # noqa: BLE001 (any failure of a claim fails the test)
            errors.append(error)
        finally:
            database.close()

    threads = [threading.Thread(target=work, args=(number,)) for number in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and left_when_done == [0, 0, 0, 0]
    every = sorted(recipient for mine in claimed for recipient in mine)
    assert every == sorted(r.id for r in Recipient.select()) and len(set(every)) == 40


def test_a_message_with_no_text_or_template_language_gets_the_defaults(broadcasts):
    first, second = broadcasts
    WhatsappBroadcast.update(message_text=None).where(WhatsappBroadcast.id == first).execute()
    WhatsappBroadcast.update(template_name=None, template_language=None).where(WhatsappBroadcast.id == second).execute()
    assert dispatch.message_body(WhatsappBroadcast.get_by_id(first), "+15550001111") == text_message("+15550001111", "")
    assert dispatch.message_body(WhatsappBroadcast.get_by_id(second), "+15550001111") == template_message(
        "+15550001111", "", "en")


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_claim_skips_recipients_another_transaction_holds_instead_of_waiting(broadcasts, database):
    first, _ = broadcasts
    dispatch.start(first, 0.0, NOW)
    held_id = Recipient.select().where(Recipient.broadcast == first).order_by(Recipient.id).first().id
    holding, release = threading.Event(), threading.Event()

    def hold_a_row() -> None:  # a results writer in another process, mid-transaction on one recipient
        with database.atomic():
            list(Recipient.select().where(Recipient.id == held_id).for_update())
            holding.set()
            release.wait()
        database.close()

    holder = threading.Thread(target=hold_a_row)
    holder.start()
    holding.wait()
    claimed = []
    claimer = threading.Thread(target=lambda: claimed.extend(dispatch.claim(first, "worker-1", 10, 30.0, NOW)))
    claimer.start()
    claimer.join(timeout=10)  # a bound on the wait, not a timing assertion: a claim that waits never returns
    release.set()
    holder.join()
    claimer.join()
    assert len(claimed) == 3 and held_id not in {c.recipient_id for c in claimed}
