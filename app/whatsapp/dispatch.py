"""The database side of sending, run in worker threads: claims with leases and shared rate slots,
each result as a counted status move, and the broadcast's end.

At most once: a claimed row is `claimed` until its own request is about to start, then `sending`
while that request may be on the wire. A lease that expires (the worker crashed or hung) turns a
`sending` row `unknown`, never back to `queued`, and a `claimed` one back to `queued`: it was
never sent.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta

import peewee

from app.whatsapp.cloud_api import template_message, text_message
from storage.db import database_proxy, is_sqlite
from storage.models import (
    WhatsappBroadcast, WhatsappBroadcastRecipient, counter_changes, move_recipients, recipient_status_counts,
)

Recipient = WhatsappBroadcastRecipient
# Slots start a little after the claim, so a send is not late by the claim's own round trip and a bunch
# of sends on time behind it do not crowd one second at the provider.
SLOT_LEAD = timedelta(seconds=0.1)
# Finished with recipients missed: `send --resend-unknown` may run them again for their unknown outcomes.
REOPENABLE_STATUSES = ("partial", "failed")


@dataclass(frozen=True, slots=True)
class ClaimedRecipient:
    recipient_id: int
    broadcast_id: int
    phone: str
    attempts: int
    send_at: datetime
    lease_expires_at: datetime
    body: dict


def _claim_transaction():
    """SQLite has no row locks: BEGIN IMMEDIATE serialises claims; PostgreSQL locks rows instead."""
    database = database_proxy.obj
    return database.atomic("IMMEDIATE") if is_sqlite(database) else database.atomic()


def _locked(query: peewee.Select, *, skip_locked: bool = False) -> peewee.Select:
    if is_sqlite(database_proxy.obj):
        return query
    return query.for_update("FOR UPDATE SKIP LOCKED" if skip_locked else "FOR UPDATE")


def start(broadcast_id: int, rate_per_second: float, now: datetime, *, reopen: bool = False) -> str:
    """pending or running -> running with this rate (also partial or failed with `reopen`, to resend
    unknown outcomes); returns the status it is in afterwards."""
    from_statuses = ("pending", "running") + (REOPENABLE_STATUSES if reopen else ())
    WhatsappBroadcast.update(
        status="running", rate_per_second=rate_per_second, completed_at=None,
        started_at=peewee.fn.COALESCE(WhatsappBroadcast.started_at, now),
    ).where(WhatsappBroadcast.id == broadcast_id, WhatsappBroadcast.status.in_(from_statuses)).execute()
    return status_of(broadcast_id)


def status_of(broadcast_id: int) -> str:
    broadcast = WhatsappBroadcast.get_or_none(WhatsappBroadcast.id == broadcast_id)
    return "missing" if broadcast is None else broadcast.status


def running_broadcast_ids() -> list[int]:
    query = WhatsappBroadcast.select(WhatsappBroadcast.id).where(WhatsappBroadcast.status == "running")
    return [broadcast.id for broadcast in query.order_by(WhatsappBroadcast.id)]


def expire_leases(broadcast_id: int, now: datetime) -> int:
    """Rows whose worker vanished mid-send may or may not have gone out: `unknown`, never resent by default.
    Rows it claimed but never started a request for go back to the queue. Returns how many turned unknown."""
    move_recipients(broadcast_id, "claimed", "queued", Recipient.lease_expires_at < now,
                    claimed_by=None, lease_expires_at=None, attempts=Recipient.attempts - 1)
    return move_recipients(broadcast_id, "sending", "unknown", Recipient.lease_expires_at < now,
                           claimed_by=None, error_message="worker lost while sending; it may have been sent",
                           error_at=now)


def mark_sending(broadcast_id: int, recipient_ids: list[int], worker_id: str) -> set[int]:
    """claimed -> sending, just before their requests start; returns the ids that moved. One missing is no
    longer this worker's claim (its lease ran out and the row went back to the queue): no request may start."""
    with database_proxy.obj.atomic():
        move_recipients(broadcast_id, "claimed", "sending", Recipient.id.in_(recipient_ids),
                        Recipient.claimed_by == worker_id)
        return {row.id for row in Recipient.select(Recipient.id).where(
            Recipient.id.in_(recipient_ids), Recipient.status == "sending", Recipient.claimed_by == worker_id)}


def requeue_unknown(broadcast_id: int) -> int:
    """--resend-unknown: the operator accepts that some of these may arrive twice."""
    return move_recipients(broadcast_id, "unknown", "queued", next_attempt_at=None)


def claim(broadcast_id: int, worker_id: str, batch_size: int, lease_s: float, now: datetime) -> list[ClaimedRecipient]:
    """Claim up to `batch_size` due recipients and reserve each a send slot from the shared schedule.

    The batch is leased until `lease_s` after its last slot; the worker starts no request in the
    lease's second half and gives up waiting for an answer in its last quarter, so a live worker
    always records its results before the lease runs out.

    The broadcast row is locked for the reservation, so slots never overlap across workers and the
    rate holds for all of them together; recipients are taken with SKIP LOCKED so claims never wait.
    """
    with _claim_transaction():
        broadcast = _locked(WhatsappBroadcast.select().where(
            WhatsappBroadcast.id == broadcast_id, WhatsappBroadcast.status == "running")).first()
        if broadcast is None:
            return []
        due = (Recipient.next_attempt_at.is_null()) | (Recipient.next_attempt_at <= now)
        rows = list(_locked(
            Recipient.select(Recipient.id, Recipient.phone, Recipient.attempts)
            .where(Recipient.broadcast == broadcast_id, Recipient.status == "queued", due)
            .order_by(Recipient.id).limit(batch_size), skip_locked=True))
        if not rows:
            return []
        interval = timedelta(seconds=1 / broadcast.rate_per_second) if broadcast.rate_per_second else timedelta(0)
        first_slot = max(broadcast.send_slot_at or now, now + SLOT_LEAD)
        next_free_slot = first_slot + len(rows) * interval
        lease_expires_at = next_free_slot + timedelta(seconds=lease_s)
        # The rows are locked (or the database is, on SQLite), so every one of them moves.
        move_recipients(broadcast_id, "queued", "claimed", Recipient.id.in_([row.id for row in rows]),
                        claimed_by=worker_id, lease_expires_at=lease_expires_at, attempts=Recipient.attempts + 1)
        WhatsappBroadcast.update(send_slot_at=next_free_slot).where(WhatsappBroadcast.id == broadcast_id).execute()
    return [ClaimedRecipient(row.id, broadcast_id, row.phone, row.attempts + 1, first_slot + index * interval,
                             lease_expires_at, message_body(broadcast, row.phone)) for index, row in enumerate(rows)]


def message_body(broadcast: WhatsappBroadcast, phone: str) -> dict:
    if broadcast.message_type == "text":
        return text_message(phone, broadcast.message_text or "")
    return template_message(phone, broadcast.template_name or "", broadcast.template_language or "en")


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """Where one claimed recipient goes, from `sending` (or `claimed` when no request started), with the
    fields that go with it."""

    claimed: ClaimedRecipient
    status: str
    fields: dict
    from_status: str = "sending"


def sent(claimed: ClaimedRecipient, message_id: str, now: datetime) -> RecipientResult:
    return RecipientResult(claimed, "sent", {"message_id": message_id, "sent_at": now, "error_code": None,
                                             "error_message": None, "error_at": None})


def failed(claimed: ClaimedRecipient, code: int | None, message: str, now: datetime) -> RecipientResult:
    return RecipientResult(claimed, "failed", {"error_code": code, "error_message": message, "error_at": now})


def unknown(claimed: ClaimedRecipient, reason: str, now: datetime) -> RecipientResult:
    return RecipientResult(claimed, "unknown", {"error_message": reason, "error_at": now})


def retry(claimed: ClaimedRecipient, code: int | None, message: str, now: datetime,
          next_attempt_at: datetime) -> RecipientResult:
    return RecipientResult(claimed, "queued", {"error_code": code, "error_message": message, "error_at": now,
                                               "next_attempt_at": next_attempt_at})


def released(claimed: ClaimedRecipient, *, from_sending: bool = False) -> RecipientResult:
    """Claimed but never sent (paused or cancelled first, or refused before any message could go):
    back in the queue, the attempt not counted."""
    return RecipientResult(claimed, "queued", {"attempts": claimed.attempts - 1},
                           "sending" if from_sending else "claimed")


def record_results(broadcast_id: int, results: list[RecipientResult]) -> int:
    """Move each claimed row out of `sending` or `claimed` and the broadcast's counters with them, in one
    transaction and one UPDATE per kind of move.

    Only rows still where the result expects them move: one whose lease expired meanwhile stays as the
    expiry left it. Locks the recipient rows before the broadcast row, like move_recipients. Returns
    how many rows moved.
    """
    groups: dict[tuple[str, str, tuple[str, ...]], list[RecipientResult]] = {}
    for result in results:
        groups.setdefault((result.from_status, result.status, tuple(result.fields)), []).append(result)
    counter_moves: Counter[str] = Counter()
    moved_count = 0
    with database_proxy.obj.atomic():
        for (from_status, status, _), group in groups.items():
            moved = (Recipient.update(status=status, claimed_by=None, lease_expires_at=None, **_per_row_fields(group))
                     .where(Recipient.id.in_([result.claimed.recipient_id for result in group]),
                            Recipient.broadcast == broadcast_id, Recipient.status == from_status)
                     .execute())
            moved_count += moved
            for counter, change in counter_changes(from_status, status).items():
                counter_moves[counter] += change * moved
        if any(counter_moves.values()):
            WhatsappBroadcast.update({getattr(WhatsappBroadcast, counter): getattr(WhatsappBroadcast, counter) + change
                                      for counter, change in counter_moves.items() if change}).where(
                WhatsappBroadcast.id == broadcast_id).execute()
    return moved_count


def _per_row_fields(group: list[RecipientResult]) -> dict[str, object]:
    """Each field's value for the whole group: the one value when the rows share it, else a CASE on the row id."""
    fields: dict[str, object] = {}
    for name in group[0].fields:
        values = [result.fields[name] for result in group]
        if len(set(values)) == 1:
            fields[name] = values[0]
        else:
            field = getattr(Recipient, name)  # converted as the field would store the value itself
            fields[name] = peewee.Case(Recipient.id, [(result.claimed.recipient_id, field.to_value(value))
                                                      for result, value in zip(group, values)])
    return fields


def pause(broadcast_id: int, reason: str) -> None:
    WhatsappBroadcast.update(status="paused", paused_reason=reason).where(
        WhatsappBroadcast.id == broadcast_id, WhatsappBroadcast.status == "running").execute()


def seconds_until_next_due(broadcast_id: int, now: datetime) -> float | None:
    """None when nothing is left to send or in flight; else how long until a queued row is due."""
    counts = recipient_status_counts(broadcast_id)
    if counts["sending"] or counts["claimed"]:
        return 0.0
    if not counts["queued"]:
        return None
    next_due = (Recipient.select(peewee.fn.MIN(Recipient.next_attempt_at))
                .where(Recipient.broadcast == broadcast_id, Recipient.status == "queued").scalar())
    return 0.0 if next_due is None else max(0.0, (next_due - now).total_seconds())


def finish(broadcast_id: int, now: datetime) -> str:
    """running -> completed (everyone sent), failed (nobody) or partial; returns the final status."""
    counts = recipient_status_counts(broadcast_id)
    reached = counts["sent"] + counts["delivered"] + counts["read"]
    missed = counts["failed"] + counts["unknown"]
    final = "completed" if not missed else ("failed" if not reached else "partial")
    WhatsappBroadcast.update(status=final, completed_at=now).where(
        WhatsappBroadcast.id == broadcast_id, WhatsappBroadcast.status == "running").execute()
    return status_of(broadcast_id)


def unlimited(rate_per_second: float) -> bool:
    return math.isinf(rate_per_second) or rate_per_second <= 0
