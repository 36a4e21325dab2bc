"""The writer task: records from concurrent calls, flush(), shutdown with records queued, bad records."""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta, timezone

import pytest
import trio

import storage.writer
from storage.migrate import apply_migrations
from storage.models import Call, CallEvent, TranscriptTurn
from storage.records import CallEnded, CallEventRecord, CallStarted, TranscriptTurnRecord
from storage.writer import StorageWriter
from tests.storage_fixtures import database, database_url  # noqa: F401 (fixtures)

CALL_START = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
# Israel in March is UTC+2: the writer must store this as 12:00:01 UTC.
ISRAEL = timezone(timedelta(hours=2))


def simulated_call(call_sid: str) -> list:
    """What the call path submits for one call: start, events, two turns, end."""
    at = lambda seconds: CALL_START + timedelta(seconds=seconds)  # noqa: E731
    return [
        CallStarted(call_sid, f"MZ{call_sid[2:]}", "+972501234567", "+15550001111", None, at(0)),
        CallEventRecord(call_sid, "first_utterance_end", at(3), {"response_id": "resp_1"}),
        TranscriptTurnRecord(call_sid, "assistant", "שלום, איך אפשר לעזור?", at(0), truncated=False),
        CallEventRecord(call_sid, "barge_in", at(6), {"talk_over_ms": 180}),
        TranscriptTurnRecord(call_sid, "assistant", "Our opening hours are", at(5), truncated=True, heard_ms=1200),
        CallEventRecord(call_sid, "dtmf", at(8), {"digit": "5"}),
        CallEnded(call_sid, at(9), "caller_hung_up"),
    ]


# A bound on hangs, not a timing assertion: a writer stuck retrying fails the test instead of stalling it.
HANG_GUARD_S = 30


async def flush(writer: StorageWriter) -> None:
    with trio.fail_after(HANG_GUARD_S):
        await writer.flush()


def call_sid(number: int) -> str:
    return f"CA{number:032x}"


@pytest.fixture
def migrated(database):
    apply_migrations(database)
    return database


@pytest.fixture
async def writer(migrated):
    writer = StorageWriter(migrated)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        yield writer
        nursery.cancel_scope.cancel()


def storage_log_lines(caplog, level: int) -> list[str]:
    return [
        record.getMessage() for record in caplog.records if record.name == "storage.writer" and record.levelno == level
    ]


async def test_records_from_concurrent_calls_are_all_written(writer):
    async def one_call(number: int) -> None:
        for record in simulated_call(call_sid(number)):
            writer.submit(record)
            await trio.sleep(0)
        await flush(writer)

    async with trio.open_nursery() as nursery:
        for number in range(8):
            nursery.start_soon(one_call, number)

    assert Call.select().count() == 8
    for number in range(8):
        call = Call.get(Call.call_sid == call_sid(number))
        assert (call.ended_at, call.end_reason) == (datetime(2025, 3, 1, 12, 0, 9), "caller_hung_up")
        events = [(event.kind, event.detail) for event in call.events.order_by(CallEvent.at)]
        assert events == [
            ("first_utterance_end", {"response_id": "resp_1"}),
            ("barge_in", {"talk_over_ms": 180}),
            ("dtmf", {"digit": "5"}),
        ]
        turns = [(turn.text, turn.truncated, turn.heard_ms) for turn in call.turns.order_by(TranscriptTurn.started_at)]
        assert turns == [("שלום, איך אפשר לעזור?", False, None), ("Our opening hours are", True, 1200)]


async def test_flush_returns_once_everything_submitted_before_it_is_written(writer):
    records = [record for number in range(200) for record in simulated_call(call_sid(number))]
    for record in records:
        writer.submit(record)
    assert writer.queued_count == len(records)

    await flush(writer)

    assert writer.queued_count == 0
    assert Call.select().where(Call.ended_at.is_null(False)).count() == 200
    assert CallEvent.select().count() == 600


async def test_times_with_a_zone_are_stored_as_utc(writer):
    writer.submit(CallStarted("CAzone", "MZzone", "+1", "+2", None, datetime(2025, 3, 1, 14, 0, 1, tzinfo=ISRAEL)))
    await flush(writer)

    assert Call.get(Call.call_sid == "CAzone").started_at == datetime(2025, 3, 1, 12, 0, 1)


async def test_records_still_queued_at_shutdown_are_written(migrated):
    writer = StorageWriter(migrated)
    records = [record for number in range(150) for record in simulated_call(call_sid(number))]
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        for record in records:
            writer.submit(record)
        assert writer.queued_count == len(records)
        nursery.cancel_scope.cancel()

    assert writer.queued_count == 0
    assert Call.select().where(Call.ended_at.is_null(False)).count() == 150
    assert TranscriptTurn.select().count() == 300


async def test_a_shutdown_during_a_batch_writes_that_batch_once_and_the_rest(migrated, monkeypatch):
    batch_started, release_batch = threading.Event(), threading.Event()
    real_write_batch = storage.writer.write_batch

    def write_batch_after_release(database, batch):
        batch_started.set()
        release_batch.wait()
        return real_write_batch(database, batch)

    monkeypatch.setattr(storage.writer, "write_batch", write_batch_after_release)
    writer = StorageWriter(migrated)
    records = [record for number in range(100) for record in simulated_call(call_sid(number))]
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        for record in records:
            writer.submit(record)
        await trio.to_thread.run_sync(batch_started.wait)
        nursery.cancel_scope.cancel()
        release_batch.set()

    assert Call.select().count() == 100
    assert CallEvent.select().count() == 300


async def test_a_record_that_cannot_be_written_is_logged_and_the_others_are_written(writer, caplog):
    caplog.set_level(logging.INFO, logger="storage.writer")
    good, *rest = simulated_call("CAgood")
    writer.submit(good)
    writer.submit(CallEventRecord("CAghost", "barge_in", CALL_START, {"talk_over_ms": 90}))
    writer.submit(good)
    writer.submit(CallEnded("CAnobody", CALL_START, "caller_hung_up"))
    for record in rest:
        writer.submit(record)

    await flush(writer)

    assert CallEvent.select().join(Call).where(Call.call_sid == "CAgood").count() == 3
    assert Call.get(Call.call_sid == "CAgood").end_reason == "caller_hung_up"
    errors = storage_log_lines(caplog, logging.ERROR)
    assert len(errors) == 3
    assert errors[0].startswith("call=CAghost [STORAGE] record not written record=CallEventRecord")
    assert errors[1].startswith("call=CAgood [STORAGE] record not written record=CallStarted")
    assert errors[2].startswith("call=CAnobody [STORAGE] record not written record=CallEnded")


async def test_over_capacity_every_record_is_kept_and_one_warning_logged(migrated, caplog):
    caplog.set_level(logging.INFO, logger="storage.writer")
    writer = StorageWriter(migrated, capacity=5)
    records = [record for number in range(3) for record in simulated_call(call_sid(number))]
    for record in records:
        writer.submit(record)

    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await flush(writer)
        nursery.cancel_scope.cancel()

    warnings = storage_log_lines(caplog, logging.WARNING)
    assert len(warnings) == 1
    assert warnings[0].startswith(f"call={call_sid(0)} [STORAGE] writer queue over capacity")
    assert CallEvent.select().count() == 9


async def test_a_failing_database_is_retried_until_the_records_are_written(database, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="storage.writer")
    monkeypatch.setattr(storage.writer, "RETRY_BASE_DELAY_S", 0.01)
    writer = StorageWriter(database)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        for record in simulated_call("CAlate"):
            writer.submit(record)
        with trio.fail_after(HANG_GUARD_S):
            while not storage_log_lines(caplog, logging.WARNING):
                await trio.sleep(0.01)
        apply_migrations(database)
        await flush(writer)
        nursery.cancel_scope.cancel()

    assert "database write failed; retrying" in storage_log_lines(caplog, logging.WARNING)[0]
    assert Call.get(Call.call_sid == "CAlate").end_reason == "caller_hung_up"
    assert CallEvent.select().count() == 3


async def test_at_shutdown_records_a_dead_database_cannot_take_are_logged_as_lost(database, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="storage.writer")
    monkeypatch.setattr(storage.writer, "RETRY_BASE_DELAY_S", 0.01)
    writer = StorageWriter(database)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        writer.submit(simulated_call("CAlost")[0])
        nursery.cancel_scope.cancel()

    errors = storage_log_lines(caplog, logging.ERROR)
    assert len(errors) == 1
    assert errors[0].startswith("call=CAlost [STORAGE] record lost at shutdown")


async def test_flush_after_the_writer_stopped_raises_instead_of_waiting_forever(migrated, caplog):
    writer = StorageWriter(migrated)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        nursery.cancel_scope.cancel()
    writer.submit(simulated_call("CAtoolate")[0])

    with pytest.raises(RuntimeError, match="writer has stopped"):
        await writer.flush()
    assert "submitted after the writer stopped" in storage_log_lines(caplog, logging.ERROR)[0]


async def test_a_call_naming_an_unknown_business_keeps_its_records(writer, caplog):
    caplog.set_level(logging.INFO, logger="storage.writer")
    started, *rest = simulated_call("CAbiz")
    writer.submit(CallStarted(started.call_sid, started.stream_sid, started.from_number, started.to_number, 999,
                              started.started_at))
    for record in rest:
        writer.submit(record)
    await flush(writer)
    call = Call.get(Call.call_sid == "CAbiz")
    assert call.business_id is None and call.end_reason == "caller_hung_up"
    assert CallEvent.select().where(CallEvent.call == call).count() == 3
    assert "call=CAbiz [STORAGE] call names an unknown business" in "\n".join(storage_log_lines(caplog, logging.WARNING))
