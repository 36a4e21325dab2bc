"""The live models. Migrations never import this module: each keeps its own frozen copy.

Times are stored as naive UTC. Status columns are free text checked in code (no CHECK
constraint), so new states such as a broadcast's `paused` need no schema change.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

import peewee

from storage.db import database_proxy, dropping_the_connection_on_failure, is_sqlite

CLAIM_STATEMENT_TIMEOUT_MS = 2_000


def utc_now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def as_utc(moment: datetime) -> datetime:
    """Naive UTC, the form every stored time takes; a naive input is taken to be UTC already."""
    if moment.tzinfo is None:
        return moment
    return moment.astimezone(timezone.utc).replace(tzinfo=None)


class JSONTextField(peewee.TextField):
    """JSON kept in a TEXT column, so SQLite and PostgreSQL share one column type."""

    def db_value(self, value):
        return None if value is None else json.dumps(value, ensure_ascii=False)

    def python_value(self, value):
        return None if value is None else json.loads(value)


class BaseModel(peewee.Model):
    class Meta:
        database = database_proxy


class Business(BaseModel):
    name = peewee.CharField(max_length=200)
    created_at = peewee.DateTimeField(default=utc_now)

    class Meta:
        table_name = "businesses"


class WhatsappBroadcast(BaseModel):
    business = peewee.ForeignKeyField(Business, column_name="business_id", backref="broadcasts")
    name = peewee.CharField(max_length=200)
    provider = peewee.CharField(max_length=50, default="meta")
    message_type = peewee.CharField(max_length=20, default="template")
    template_id = peewee.CharField(max_length=100, null=True)
    template_name = peewee.CharField(max_length=200, null=True)
    template_language = peewee.CharField(max_length=20, null=True)
    message_text = peewee.TextField(null=True)
    audience_filter = JSONTextField(null=True)
    status = peewee.CharField(max_length=20, default="pending")
    total_recipients = peewee.IntegerField(default=0)
    sent_count = peewee.IntegerField(default=0)
    failed_count = peewee.IntegerField(default=0)
    delivered_count = peewee.IntegerField(default=0)
    read_count = peewee.IntegerField(default=0)
    unknown_count = peewee.IntegerField(default=0)
    paused_reason = peewee.TextField(null=True)
    rate_per_second = peewee.FloatField(null=True)
    # The next free send slot, shared by every worker: claims reserve slots from max(this, now) on.
    send_slot_at = peewee.DateTimeField(null=True)
    created_by = peewee.CharField(max_length=200, null=True)
    created_at = peewee.DateTimeField(default=utc_now)
    started_at = peewee.DateTimeField(null=True)
    completed_at = peewee.DateTimeField(null=True)
    stopped_by = peewee.CharField(max_length=200, null=True)
    stopped_at = peewee.DateTimeField(null=True)

    class Meta:
        table_name = "whatsapp_broadcasts"


class WhatsappBroadcastRecipient(BaseModel):
    broadcast = peewee.ForeignKeyField(
        WhatsappBroadcast, column_name="broadcast_id", backref="recipients", on_delete="CASCADE"
    )
    business = peewee.ForeignKeyField(Business, column_name="business_id")
    phone = peewee.CharField(max_length=20)
    name = peewee.CharField(max_length=200, null=True)
    lead_id = peewee.CharField(max_length=64, null=True)
    status = peewee.CharField(max_length=20, default="queued")
    claimed_by = peewee.CharField(max_length=100, null=True)
    lease_expires_at = peewee.DateTimeField(null=True)
    error_code = peewee.IntegerField(null=True)
    error_message = peewee.TextField(null=True)
    error_at = peewee.DateTimeField(null=True)
    message_id = peewee.CharField(max_length=200, null=True)
    attempts = peewee.IntegerField(default=0)
    next_attempt_at = peewee.DateTimeField(null=True)
    created_at = peewee.DateTimeField(default=utc_now)
    sent_at = peewee.DateTimeField(null=True)
    delivered_at = peewee.DateTimeField(null=True)
    read_at = peewee.DateTimeField(null=True)

    class Meta:
        table_name = "whatsapp_broadcast_recipients"


BROADCAST_STATUSES = ("pending", "running", "paused", "completed", "partial", "failed", "cancelled")
FINISHED_BROADCAST_STATUSES = frozenset({"completed", "partial", "failed", "cancelled"})
RECIPIENT_STATUSES = ("queued", "claimed", "sending", "sent", "delivered", "read", "failed", "unknown")

# The recipient statuses each broadcast counter counts: a funnel, so a read message was also sent and delivered.
COUNTED_STATUSES = {
    "sent_count": frozenset({"sent", "delivered", "read"}),
    "delivered_count": frozenset({"delivered", "read"}),
    "read_count": frozenset({"read"}),
    "failed_count": frozenset({"failed"}),
    "unknown_count": frozenset({"unknown"}),
}


def counter_changes(from_status: str, to_status: str) -> dict[str, int]:
    """How each broadcast counter moves when one recipient goes from `from_status` to `to_status`."""
    changes = {
        counter: (to_status in statuses) - (from_status in statuses) for counter, statuses in COUNTED_STATUSES.items()
    }
    return {counter: change for counter, change in changes.items() if change}


def move_recipients(
    broadcast_id: int, from_status: str, to_status: str, *conditions: peewee.Expression, **fields: object
) -> int:
    """Move the broadcast's recipients in `from_status` (and matching `conditions`) to `to_status`.

    The rows and the broadcast's counters change in one transaction, and only rows still in
    `from_status` move, so of two workers or callbacks racing on a row exactly one counts it.
    Locks recipient rows before the broadcast row; claims that lock the broadcast first must
    take recipients with SKIP LOCKED. Returns how many rows moved.
    """
    recipient = WhatsappBroadcastRecipient
    with recipient._meta.database.atomic():
        moved_count = (
            recipient.update(status=to_status, **fields)
            .where(recipient.broadcast == broadcast_id, recipient.status == from_status, *conditions)
            .execute()
        )
        changes = counter_changes(from_status, to_status)
        if moved_count and changes:
            counters = {
                getattr(WhatsappBroadcast, counter): getattr(WhatsappBroadcast, counter) + change * moved_count
                for counter, change in changes.items()
            }
            WhatsappBroadcast.update(counters).where(WhatsappBroadcast.id == broadcast_id).execute()
    return moved_count


def recipient_status_counts(broadcast_id: int) -> dict[str, int]:
    """How many of the broadcast's recipients are in each status, counted from the rows (every status present)."""
    recipient = WhatsappBroadcastRecipient
    rows = (
        recipient.select(recipient.status, peewee.fn.COUNT(recipient.id))
        .where(recipient.broadcast == broadcast_id)
        .group_by(recipient.status)
        .tuples()
    )
    return {status: 0 for status in RECIPIENT_STATUSES} | dict(rows)


def counters_from_rows(broadcast_id: int) -> dict[str, int]:
    """What the broadcast's stored counters must equal, derived from its recipients."""
    by_status = recipient_status_counts(broadcast_id)
    return {
        counter: sum(by_status.get(status, 0) for status in statuses) for counter, statuses in COUNTED_STATUSES.items()
    }


class Call(BaseModel):
    call_sid = peewee.CharField(max_length=64, unique=True)
    stream_sid = peewee.CharField(max_length=64)
    from_number = peewee.TextField()
    to_number = peewee.TextField()
    business = peewee.ForeignKeyField(Business, column_name="business_id", null=True)
    started_at = peewee.DateTimeField()
    ended_at = peewee.DateTimeField(null=True)
    end_reason = peewee.CharField(max_length=50, null=True)

    class Meta:
        table_name = "calls"


class CallEvent(BaseModel):
    call = peewee.ForeignKeyField(
        Call, field=Call.call_sid, column_name="call_sid", backref="events", on_delete="CASCADE"
    )
    kind = peewee.CharField(max_length=40)
    at = peewee.DateTimeField()
    detail = JSONTextField(default=dict)

    class Meta:
        table_name = "call_events"


class TranscriptTurn(BaseModel):
    call = peewee.ForeignKeyField(
        Call, field=Call.call_sid, column_name="call_sid", backref="turns", on_delete="CASCADE"
    )
    role = peewee.CharField(max_length=20)
    text = peewee.TextField()
    started_at = peewee.DateTimeField()
    truncated = peewee.BooleanField(default=False)
    heard_ms = peewee.IntegerField(null=True)

    class Meta:
        table_name = "transcript_turns"


class MediaStreamClaim(BaseModel):
    """A stream token spent: the first stream for a CallSid claims it, in whichever process."""

    call_sid = peewee.CharField(max_length=64, primary_key=True)
    claimed_at = peewee.DateTimeField()

    class Meta:
        table_name = "media_stream_claims"


def claim_media_stream(database: peewee.Database, call_sid: str) -> bool:
    """True for the first stream of this call across every process sharing the database, False after."""
    with dropping_the_connection_on_failure(database), database.atomic():
        if not is_sqlite(database):
            # A stream waits for this answer before its greeting: never for long.
            database.execute_sql(f"SET LOCAL statement_timeout = {CLAIM_STATEMENT_TIMEOUT_MS}")
        query = MediaStreamClaim.insert(call_sid=call_sid, claimed_at=utc_now()).on_conflict_ignore()
        return database.execute(query).rowcount == 1


def stored_end_reason(database: peewee.Database, call_sid: str) -> str | None:
    """Why the call ended, as its record says; None while no process has recorded its end."""
    with dropping_the_connection_on_failure(database):
        return Call.select(Call.end_reason).where(Call.call_sid == call_sid).scalar()


ALL_MODELS = (Business, WhatsappBroadcast, WhatsappBroadcastRecipient, Call, CallEvent, TranscriptTurn,
              MediaStreamClaim)
