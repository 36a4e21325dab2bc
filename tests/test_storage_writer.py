"""The writer task: records from concurrent calls, flush(), shutdown with records queued, bad records."""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
from datetime import datetime, timedelta, timezone

import peewee
import psycopg2
import pytest
import trio

import storage.db
import storage.writer
from storage.migrate import apply_migrations
from storage.models import (
    Business, Call, CallEvent, TranscriptTurn, WhatsappBroadcast, WhatsappBroadcastRecipient, move_recipients, utc_now,
)
from storage.records import CallEnded, CallEventRecord, CallStarted, TranscriptTurnRecord, WhatsappStatusRecord
from storage.writer import StorageWriter, retry_delay_s
from tests.storage_fixtures import (  # noqa: F401 (fixtures)
    database, database_url, migrated_database, migrated_database_url, postgres_database_url)

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
HANG_GUARD_S = 10


class RetriedPastAnyLimit(BaseException):
    """Not an Exception, so the writer's retry loop cannot catch it: it ends a writer that never gives up."""


def give_up_after(attempts: int, monkeypatch) -> None:
    """Batch writes past `attempts` raise RetriedPastAnyLimit: a shielded shutdown retrying for ever fails fast."""
    real_write, calls = storage.writer.write_batch_on_a_live_connection, []

    def write(database, batch):
        calls.append(len(batch))
        if len(calls) > attempts:
            raise RetriedPastAnyLimit(f"{len(calls)} attempts")
        return real_write(database, batch)

    monkeypatch.setattr(storage.writer, "write_batch_on_a_live_connection", write)


async def flush(writer: StorageWriter) -> None:
    with trio.fail_after(HANG_GUARD_S):
        await writer.flush()


def call_sid(number: int) -> str:
    return f"CA{number:032x}"


@pytest.fixture
def postgres_migrated(postgres_database_url):
    database = storage.db.open_database(postgres_database_url)
    apply_migrations(database)
    yield database
    database.close()


@pytest.fixture
async def writer(migrated_database):
    writer = StorageWriter(migrated_database)
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


async def test_records_still_queued_at_shutdown_are_written(migrated_database):
    writer = StorageWriter(migrated_database)
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


async def test_a_shutdown_during_a_batch_writes_that_batch_once_and_the_rest(migrated_database, monkeypatch):
    batch_started, release_batch = threading.Event(), threading.Event()
    real_write_batch = storage.writer.write_batch

    def write_batch_after_release(database, batch):
        batch_started.set()
        release_batch.wait()
        return real_write_batch(database, batch)

    monkeypatch.setattr(storage.writer, "write_batch", write_batch_after_release)
    writer = StorageWriter(migrated_database)
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
    assert errors[0].startswith("call=CAghost [STORAGE] record not written record=CallEventRecord error=")
    assert errors[1].startswith("call=CAgood [STORAGE] record not written record=CallStarted error=")
    assert errors[2] == "call=CAnobody [STORAGE] record not written record=CallEnded error='no call CAnobody to end'"


async def test_over_capacity_every_record_is_kept_and_one_warning_logged(migrated_database, caplog):
    caplog.set_level(logging.INFO, logger="storage.writer")
    writer = StorageWriter(migrated_database, capacity=5)
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
    give_up_after(5, monkeypatch)
    writer = StorageWriter(database)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        writer.submit(simulated_call("CAlost")[0])
        nursery.cancel_scope.cancel()

    errors = storage_log_lines(caplog, logging.ERROR)
    warnings = storage_log_lines(caplog, logging.WARNING)
    # Two retries, then the third and last attempt at shutdown gives up; each line names the database's error.
    lines = [line.split(" error=", 1) for line in warnings + errors]
    assert [line[0] for line in lines] == [
        "call=CAlost [STORAGE] database write failed; retrying records=1 attempt=1",
        "call=CAlost [STORAGE] database write failed; retrying records=1 attempt=2",
        "call=CAlost [STORAGE] record lost at shutdown: database unavailable record=CallStarted",
    ]
    assert len({line[1] for line in lines}) == 1 and "calls" in lines[0][1]


async def test_flush_after_the_writer_stopped_raises_instead_of_waiting_forever(migrated_database, caplog):
    writer = StorageWriter(migrated_database)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        nursery.cancel_scope.cancel()
    writer.submit(simulated_call("CAtoolate")[0])

    with pytest.raises(RuntimeError) as raised, trio.fail_after(HANG_GUARD_S):
        await writer.flush()
    assert str(raised.value) == "the storage writer has stopped; queued records cannot be written"
    assert storage_log_lines(caplog, logging.ERROR) == [
        "call=CAtoolate [STORAGE] record submitted after the writer stopped; it will not be written record=CallStarted"]


async def test_a_call_naming_an_unknown_business_keeps_its_records(writer, caplog):
    caplog.set_level(logging.INFO, logger="storage.writer")
    Business.create(name="Acme", created_at=utc_now())  # some business exists, just not the one named
    started, *rest = simulated_call("CAbiz")
    writer.submit(CallStarted(started.call_sid, started.stream_sid, started.from_number, started.to_number, 999,
                              started.started_at))
    for record in rest:
        writer.submit(record)
    await flush(writer)
    call = Call.get(Call.call_sid == "CAbiz")
    assert call.business_id is None and call.end_reason == "caller_hung_up"
    assert CallEvent.select().where(CallEvent.call == call).count() == 3
    assert storage_log_lines(caplog, logging.WARNING) == [
        "call=CAbiz [STORAGE] call names an unknown business; stored without one business_id=999"]


def test_the_backoff_doubles_from_half_a_second_up_to_ten():
    assert [retry_delay_s(attempt) for attempt in range(1, 8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


async def test_records_are_written_in_batches_of_at_most_the_batch_size(migrated_database, monkeypatch):
    monkeypatch.setattr(storage.writer, "BATCH_SIZE", 3)
    batch_sizes = []
    real_write_batch = storage.writer.write_batch

    def counting_write_batch(database, batch):
        batch_sizes.append(len(batch))
        return real_write_batch(database, batch)

    monkeypatch.setattr(storage.writer, "write_batch", counting_write_batch)
    writer = StorageWriter(migrated_database)
    for record in simulated_call("CAbatch"):
        writer.submit(record)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await flush(writer)
        nursery.cancel_scope.cancel()

    assert batch_sizes == [3, 3, 1]
    assert Call.get(Call.call_sid == "CAbatch").end_reason == "caller_hung_up"


async def test_flush_with_nothing_submitted_returns_at_once(migrated_database):
    writer = StorageWriter(migrated_database)
    with trio.fail_after(HANG_GUARD_S):
        await writer.flush()


async def test_a_known_business_is_kept_on_the_call(writer):
    business = Business.create(name="Acme", created_at=utc_now())
    started = simulated_call("CAacme")[0]
    writer.submit(CallStarted(started.call_sid, started.stream_sid, started.from_number, started.to_number,
                              business.id, started.started_at))
    await flush(writer)

    assert Call.get(Call.call_sid == "CAacme").business_id == business.id


async def test_a_delivery_status_moves_its_recipient_forward(writer):
    business = Business.create(name="Acme", created_at=utc_now())
    broadcast = WhatsappBroadcast.create(business=business, name="b", template_name="t", template_language="he",
                                         status="running", total_recipients=1)
    row = WhatsappBroadcastRecipient.create(broadcast=broadcast, business=business, phone="+972502345600")
    move_recipients(broadcast.id, "queued", "sent", WhatsappBroadcastRecipient.id == row.id, message_id="wamid.1")

    writer.submit(WhatsappStatusRecord("wamid.1", "delivered", CALL_START))
    await flush(writer)

    delivered = WhatsappBroadcastRecipient.get_by_id(row.id)
    assert (delivered.status, delivered.delivered_at) == ("delivered", CALL_START.replace(tzinfo=None))


async def test_something_that_is_not_a_record_is_logged_and_the_rest_written(writer, caplog):
    caplog.set_level(logging.INFO, logger="storage.writer")
    writer.submit(StrayRecord())
    writer.submit(simulated_call("CAafter")[0])
    await flush(writer)

    assert storage_log_lines(caplog, logging.ERROR) == [
        "call=CAstray [STORAGE] record not written record=StrayRecord error='not a call record: StrayRecord'"]
    assert Call.get(Call.call_sid == "CAafter")


async def test_an_error_without_a_message_is_logged_by_its_type(writer, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="storage.writer")
    real_write_record = storage.writer.write_record

    def failing_on_events(record):
        if isinstance(record, CallEventRecord):
            raise ValueError()
        real_write_record(record)

    monkeypatch.setattr(storage.writer, "write_record", failing_on_events)
    writer.submit(simulated_call("CAempty")[1])
    await flush(writer)

    assert storage_log_lines(caplog, logging.ERROR) == [
        "call=CAempty [STORAGE] record not written record=CallEventRecord error=ValueError"]


async def test_over_capacity_warns_once_per_overflow_and_again_after_the_queue_drained(migrated_database, caplog):
    caplog.set_level(logging.INFO, logger="storage.writer")
    writer = StorageWriter(migrated_database, capacity=3)
    records = simulated_call("CAfull")
    for record in records[:3]:
        writer.submit(record)
    assert storage_log_lines(caplog, logging.WARNING) == []  # at capacity, not over it
    for record in records[3:]:
        writer.submit(record)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await flush(writer)
        for record in simulated_call("CAagain"):
            writer.submit(record)
        await flush(writer)
        nursery.cancel_scope.cancel()

    assert storage_log_lines(caplog, logging.WARNING) == [
        "call=CAfull [STORAGE] writer queue over capacity; keeping records in memory queued=4 capacity=3",
        "call=CAagain [STORAGE] writer queue over capacity; keeping records in memory queued=4 capacity=3",
    ]


def test_the_default_capacity_is_ten_thousand_records(migrated_database, caplog):
    caplog.set_level(logging.INFO, logger="storage.writer")
    writer = StorageWriter(migrated_database)
    record = simulated_call("CAmany")[1]
    for _ in range(10_000):
        writer.submit(record)
    assert storage_log_lines(caplog, logging.WARNING) == []
    writer.submit(record)
    assert len(storage_log_lines(caplog, logging.WARNING)) == 1


class StrayRecord:
    """Not one of the record types: what a caller of submit() might pass by mistake."""

    log_id = "CAstray"


async def test_a_queue_still_at_capacity_does_not_warn_again(migrated_database, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="storage.writer")
    monkeypatch.setattr(storage.writer, "BATCH_SIZE", 2)
    second_batch_started, release = threading.Event(), threading.Event()
    real_write_batch = storage.writer.write_batch
    batches = []

    def write_batch_held_at_the_second(database, batch):
        batches.append(len(batch))
        if len(batches) == 2:
            second_batch_started.set()
            release.wait()
        return real_write_batch(database, batch)

    monkeypatch.setattr(storage.writer, "write_batch", write_batch_held_at_the_second)
    writer = StorageWriter(migrated_database, capacity=3)
    records = simulated_call("CAedge")
    for record in records[:5]:
        writer.submit(record)  # over capacity at the fourth: one warning
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await trio.to_thread.run_sync(second_batch_started.wait)
        writer.submit(records[5])  # three were queued after the first batch: at capacity, never below it
        release.set()
        await flush(writer)
        nursery.cancel_scope.cancel()

    assert len(storage_log_lines(caplog, logging.WARNING)) == 1


def terminate_other_connections(database_url: str) -> int:
    """What a PostgreSQL restart or failover does to the writer: its connections die under it."""
    server_url = database_url.rsplit("/", 1)[0] + "/postgres"
    name = database_url.rsplit("/", 1)[1]
    connection = psycopg2.connect(server_url)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                           "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
            return cursor.fetchone()[0]
    finally:
        connection.close()


async def test_connections_killed_under_the_writer_are_replaced_and_no_record_is_lost(
        postgres_migrated, postgres_database_url, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="storage.writer")
    monkeypatch.setattr(storage.writer, "RETRY_BASE_DELAY_S", 0.01)
    postgres_migrated.close()  # the test's own connection dies too; peewee opens a new one when it next reads
    writer = StorageWriter(postgres_migrated)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        for number in range(3):
            for record in simulated_call(call_sid(number))[:3]:
                writer.submit(record)
            await flush(writer)
            assert await trio.to_thread.run_sync(terminate_other_connections, postgres_database_url) >= 1
        for number in range(3):
            for record in simulated_call(call_sid(number))[3:]:
                writer.submit(record)
        await flush(writer)
        nursery.cancel_scope.cancel()

    assert [call.end_reason for call in Call.select().order_by(Call.call_sid)] == ["caller_hung_up"] * 3
    assert CallEvent.select().count() == 9 and TranscriptTurn.select().count() == 6
    retries = storage_log_lines(caplog, logging.WARNING)
    assert retries and all("database write failed; retrying" in line for line in retries)
    assert not storage_log_lines(caplog, logging.ERROR)


async def test_a_table_locked_by_someone_else_times_the_write_out_and_it_is_retried(
        postgres_migrated, postgres_database_url, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="storage.writer")
    monkeypatch.setattr(storage.writer, "RETRY_BASE_DELAY_S", 0.01)
    monkeypatch.setattr(storage.writer, "STATEMENT_TIMEOUT_MS", 100)
    locker = psycopg2.connect(postgres_database_url)
    locker.cursor().execute("LOCK TABLE calls IN ACCESS EXCLUSIVE MODE")  # held until the transaction ends
    writer = StorageWriter(postgres_migrated)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        try:
            writer.submit(simulated_call("CAlocked")[0])
            with trio.fail_after(HANG_GUARD_S):
                while not storage_log_lines(caplog, logging.WARNING):
                    await trio.sleep(0.01)
        finally:
            locker.rollback()  # even when the write never timed out: the writer could not stop otherwise
            locker.close()
        await flush(writer)
        nursery.cancel_scope.cancel()

    assert "statement timeout" in storage_log_lines(caplog, logging.WARNING)[0]
    assert Call.select().where(Call.call_sid == "CAlocked").count() == 1


def test_a_postgresql_server_that_never_answers_fails_the_connection_within_its_timeout(monkeypatch):
    listener = socket.create_server(("127.0.0.1", 0))  # accepts, then says nothing: a blackholed server
    monkeypatch.setattr(storage.db, "POSTGRES_CONNECT_TIMEOUT_S", 2)  # libpq's least
    database = storage.db.open_database(f"postgresql://callgate:x@127.0.0.1:{listener.getsockname()[1]}/callgate")
    errors = []

    def connect() -> None:
        try:
            database.connect()
        except peewee.OperationalError as error:
            errors.append(error)

    attempt = threading.Thread(target=connect, daemon=True)  # without a timeout libpq would wait for ever
    attempt.start()
    attempt.join(HANG_GUARD_S)
    listener.close()
    assert len(errors) == 1 and "timeout" in str(errors[0])


async def test_a_bug_of_ours_in_a_batch_write_is_retried_and_never_stops_the_writer(migrated_database, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="storage.writer")
    monkeypatch.setattr(storage.writer, "RETRY_BASE_DELAY_S", 0.01)
    real_write_batch, calls = storage.writer.write_batch, []

    def fails_once(database, batch):
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return real_write_batch(database, batch)

    monkeypatch.setattr(storage.writer, "write_batch", fails_once)
    writer = StorageWriter(migrated_database)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        for record in simulated_call("CAbug"):
            writer.submit(record)
        await flush(writer)
        nursery.cancel_scope.cancel()

    assert calls == [7, 7]
    assert storage_log_lines(caplog, logging.WARNING) == [
        "call=CAbug [STORAGE] database write failed; retrying records=7 attempt=1 error='a bug'"]
    assert Call.get(Call.call_sid == "CAbug").end_reason == "caller_hung_up"


async def test_a_sip_caller_id_is_stored_whole_with_every_record_of_its_call(writer):
    sip_caller = "sip:+14155550100@callgate-test.sip.us1.twilio.com;transport=tls"
    started, *rest = simulated_call("CAsip")
    writer.submit(dataclasses.replace(started, from_number=sip_caller))
    for record in rest:
        writer.submit(record)
    await flush(writer)

    call = Call.get(Call.call_sid == "CAsip")
    assert (call.from_number, call.end_reason) == (sip_caller, "caller_hung_up")
    assert CallEvent.select().count() == 3 and TranscriptTurn.select().count() == 2
