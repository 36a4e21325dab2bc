"""What happened on each call: the call, its events (barge-ins, errors, DTMF) and its transcript."""

import peewee

from storage.migrations._steps import CreateTables, FrozenModel, reference


class Call(FrozenModel):
    call_sid = peewee.CharField(max_length=64, unique=True)
    stream_sid = peewee.CharField(max_length=64)
    from_number = peewee.CharField(max_length=32)
    to_number = peewee.CharField(max_length=32)
    business = peewee.ForeignKeyField(reference("businesses"), column_name="business_id", null=True)
    started_at = peewee.DateTimeField(index=True)
    ended_at = peewee.DateTimeField(null=True)
    end_reason = peewee.CharField(max_length=50, null=True)

    class Meta:
        table_name = "calls"


class CallEvent(FrozenModel):
    call = peewee.ForeignKeyField(Call, field=Call.call_sid, column_name="call_sid", on_delete="CASCADE")
    kind = peewee.CharField(max_length=40)
    at = peewee.DateTimeField()
    detail = peewee.TextField()

    class Meta:
        table_name = "call_events"


class TranscriptTurn(FrozenModel):
    call = peewee.ForeignKeyField(Call, field=Call.call_sid, column_name="call_sid", on_delete="CASCADE")
    role = peewee.CharField(max_length=20)
    text = peewee.TextField()
    started_at = peewee.DateTimeField()
    truncated = peewee.BooleanField()
    heard_ms = peewee.IntegerField(null=True)

    class Meta:
        table_name = "transcript_turns"


def forward(migrator):
    return [CreateTables(migrator, Call, CallEvent, TranscriptTurn)]
