"""The database side of sending, run in worker threads: claims with leases and shared rate slots,
each result as a counted status move, and the broadcast's end.

At most once: a row is `sending` while its request may be on the wire. A lease that expires
(the worker crashed or hung) turns it `unknown`, never back to `queued`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

import peewee

from app.whatsapp.cloud_api import template_message, text_message
from storage.db import database_proxy, is_sqlite
from storage.models import WhatsappBroadcast, WhatsappBroadcastRecipient, move_recipients, recipient_status_counts

Recipient = WhatsappBroadcastRecipient


@dataclass(frozen=True, slots=True)
class ClaimedRecipient:
    recipient_id: int
    broadcast_id: int
    phone: str
    attempts: int
    send_at: datetime
    body: dict


def _claim_transaction():
    """SQLite has no row locks: BEGIN IMMEDIATE serialises claims; PostgreSQL locks rows instead."""
    database = database_proxy.obj
    return database.atomic("IMMEDIATE") if is_sqlite(database) else database.atomic()


def _locked(query: peewee.Select, *, skip_locked: bool = False) -> peewee.Select:
    if is_sqlite(database_proxy.obj):
        return query
    return query.for_update("FOR UPDATE SKIP LOCKED" if skip_locked else "FOR UPDATE")


def start(broadcast_id: int, rate_per_second: float, now: datetime) -> str:
    """pending or running -> running with this rate; returns the status it is in afterwards."""
    WhatsappBroadcast.update(
        status="running", rate_per_second=rate_per_second,
        started_at=peewee.fn.COALESCE(WhatsappBroadcast.started_at, now),
    ).where(WhatsappBroadcast.id == broadcast_id, WhatsappBroadcast.status.in_(("pending", "running"))).execute()
    return status_of(broadcast_id)


def status_of(broadcast_id: int) -> str:
    broadcast = WhatsappBroadcast.get_or_none(WhatsappBroadcast.id == broadcast_id)
    return "missing" if broadcast is None else broadcast.status


def running_broadcast_ids() -> list[int]:
    query = WhatsappBroadcast.select(WhatsappBroadcast.id).where(WhatsappBroadcast.status == "running")
    return [broadcast.id for broadcast in query.order_by(WhatsappBroadcast.id)]


def expire_leases(broadcast_id: int, now: datetime) -> int:
    """Rows whose worker vanished mid-send may or may not have gone out: `unknown`, never resent by default."""
    return move_recipients(broadcast_id, "sending", "unknown", Recipient.lease_expires_at < now,
                           claimed_by=None, error_message="worker lost while sending; it may have been sent")


def requeue_unknown(broadcast_id: int) -> int:
    """--resend-unknown: the operator accepts that some of these may arrive twice."""
    return move_recipients(broadcast_id, "unknown", "queued", next_attempt_at=None)


def claim(broadcast_id: int, worker_id: str, batch_size: int, lease_s: float, now: datetime) -> list[ClaimedRecipient]:
    """Claim up to `batch_size` due recipients and reserve each a send slot from the shared schedule.

    Each claim is leased until `lease_s` after its slot: longer than a request can take, so a live
    worker always records its result before the lease runs out.

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
        interval = timedelta(seconds=1 / broadcast.rate_per_second) if broadcast.rate_per_second else timedelta(0)
        first_slot = max(broadcast.send_slot_at or now, now)
        claimed = []
        for index, row in enumerate(rows):
            send_at = first_slot + index * interval
            moved = move_recipients(
                broadcast_id, "queued", "sending", Recipient.id == row.id, claimed_by=worker_id,
                lease_expires_at=send_at + timedelta(seconds=lease_s),
                attempts=row.attempts + 1)
            if moved:
                claimed.append(ClaimedRecipient(row.id, broadcast_id, row.phone, row.attempts + 1, send_at,
                                                message_body(broadcast, row.phone)))
        if claimed:
            WhatsappBroadcast.update(send_slot_at=first_slot + len(claimed) * interval).where(
                WhatsappBroadcast.id == broadcast_id).execute()
    return claimed


def message_body(broadcast: WhatsappBroadcast, phone: str) -> dict:
    if broadcast.message_type == "text":
        return text_message(phone, broadcast.message_text or "")
    return template_message(phone, broadcast.template_name or "", broadcast.template_language or "en")


def record_sent(claimed: ClaimedRecipient, message_id: str, now: datetime) -> None:
    move_recipients(claimed.broadcast_id, "sending", "sent", Recipient.id == claimed.recipient_id,
                    message_id=message_id, sent_at=now, error_code=None, error_message=None,
                    claimed_by=None, lease_expires_at=None)


def record_failed(claimed: ClaimedRecipient, code: int | None, message: str) -> None:
    move_recipients(claimed.broadcast_id, "sending", "failed", Recipient.id == claimed.recipient_id,
                    error_code=code, error_message=message, claimed_by=None, lease_expires_at=None)


def record_unknown(claimed: ClaimedRecipient, reason: str) -> None:
    move_recipients(claimed.broadcast_id, "sending", "unknown", Recipient.id == claimed.recipient_id,
                    error_message=reason, claimed_by=None, lease_expires_at=None)


def record_retry(claimed: ClaimedRecipient, code: int | None, message: str, next_attempt_at: datetime) -> None:
    move_recipients(claimed.broadcast_id, "sending", "queued", Recipient.id == claimed.recipient_id,
                    error_code=code, error_message=message, next_attempt_at=next_attempt_at,
                    claimed_by=None, lease_expires_at=None)


def release(claimed: ClaimedRecipient) -> None:
    """Claimed but never sent (paused or cancelled first): back in the queue, the attempt not counted."""
    move_recipients(claimed.broadcast_id, "sending", "queued", Recipient.id == claimed.recipient_id,
                    attempts=claimed.attempts - 1, claimed_by=None, lease_expires_at=None)


def pause(broadcast_id: int, reason: str) -> None:
    WhatsappBroadcast.update(status="paused", paused_reason=reason).where(
        WhatsappBroadcast.id == broadcast_id, WhatsappBroadcast.status == "running").execute()


def seconds_until_next_due(broadcast_id: int, now: datetime) -> float | None:
    """None when nothing is left to send or in flight; else how long until a queued row is due."""
    counts = recipient_status_counts(broadcast_id)
    if counts["sending"]:
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
