"""The live models. Migrations never import this module: each keeps its own frozen copy.

Times are stored as naive UTC. Status columns are free text checked in code (no CHECK
constraint), so new states such as a broadcast's `paused` need no schema change.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

import peewee

from storage.db import database_proxy


def utc_now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


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
    message_text = peewee.TextField(null=True)
    audience_filter = JSONTextField(null=True)
    status = peewee.CharField(max_length=20, default="pending")
    total_recipients = peewee.IntegerField(default=0)
    sent_count = peewee.IntegerField(default=0)
    failed_count = peewee.IntegerField(default=0)
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
    lead_id = peewee.CharField(max_length=64, null=True)
    status = peewee.CharField(max_length=20, default="queued")
    error_message = peewee.TextField(null=True)
    message_id = peewee.CharField(max_length=200, null=True)
    attempts = peewee.IntegerField(default=0)
    next_attempt_at = peewee.DateTimeField(null=True)
    created_at = peewee.DateTimeField(default=utc_now)
    sent_at = peewee.DateTimeField(null=True)
    delivered_at = peewee.DateTimeField(null=True)
    read_at = peewee.DateTimeField(null=True)

    class Meta:
        table_name = "whatsapp_broadcast_recipients"


class Call(BaseModel):
    call_sid = peewee.CharField(max_length=64, unique=True)
    stream_sid = peewee.CharField(max_length=64)
    from_number = peewee.CharField(max_length=32)
    to_number = peewee.CharField(max_length=32)
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


ALL_MODELS = (Business, WhatsappBroadcast, WhatsappBroadcastRecipient, Call, CallEvent, TranscriptTurn)
