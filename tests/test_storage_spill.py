"""The spill file: a bounded writer queue, records the database cannot take kept on disk, and the next start writing them."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import trio

import storage.spill
import storage.writer
from storage.migrate import apply_migrations
from storage.models import Call, CallEvent, TranscriptTurn
from storage.records import CallEnded, CallEventRecord, CallStarted, TranscriptTurnRecord, WhatsappStatusRecord
from storage.spill import SpillError, SpillFile, decode_record, encode_record
from storage.writer import StorageWriter, StorageWriters
from tests.storage_fixtures import database, database_url, migrated_database, migrated_database_url  # noqa: F401
from tests.test_storage_writer import HANG_GUARD_S, flush, give_up_after, simulated_call, storage_log_lines

ISRAEL = timezone(timedelta(hours=2))


def test_every_kind_of_record_comes_back_from_its_line_as_it_went_in():
    at = datetime(2025, 3, 1, 14, 0, 1, 250_000, tzinfo=ISRAEL)
    records = [
        CallStarted("CA1", "MZ1", "sip:+14155550100@x.pstn.twilio.com", "+15550001111", 7, at),
        CallStarted("CA2", "MZ2", "", "", None, at),
        CallEventRecord("CA1", "barge_in", at, {"talk_over_ms": 120, "nested": {"a": [1, None]}}),
        TranscriptTurnRecord("CA1", "assistant", "שלום\nline two", at, truncated=True, heard_ms=1200),
        CallEnded("CA1", at, "caller_hung_up"),
        WhatsappStatusRecord("wamid.1", "failed", at, 131026, "Receiver incapable", log_id="CA9"),
        WhatsappStatusRecord("wamid.2", "sent", None),
    ]
    lines = [encode_record(record) for record in records]
    assert all("\n" not in line for line in lines)
    assert [decode_record(line) for line in lines] == records
    assert decode_record(lines[0]).started_at.utcoffset() == timedelta(hours=2)


@pytest.mark.parametrize("line", [
    "", "{", "[]", '{"type": "Nope", "fields": {}}', '{"type": "CallEnded", "fields": {"call_sid": "CA1"}}',
    '{"type": "CallEnded"}', '{"type": "CallEnded", "fields": {"call_sid": "CA1", "ended_at": '
    '{"$datetime": "yesterday"}, "end_reason": "x"}}',
])
def test_a_line_we_did_not_write_is_a_spill_error(line):
    with pytest.raises(SpillError):
        decode_record(line)


def test_records_are_taken_back_oldest_first_and_the_file_goes_when_empty(tmp_path):
    spill = SpillFile(tmp_path, "calls")
    records = simulated_call("CA1")
    spill.append(records[:3])
    spill.append(records[3:])
    assert spill.take(2) == records[:2]
    spill.prepend(records[:1])
    assert spill.take(100) == records[:1] + records[2:]
    assert spill.is_empty() and not spill.path.exists()


def test_a_torn_last_line_is_logged_and_the_rest_taken_back(tmp_path, caplog):
    spill = SpillFile(tmp_path, "calls")
    records = simulated_call("CA1")
    spill.append(records)
    with spill.path.open("a") as file:
        file.write('{"type": "CallEnded", "fie')  # the process died mid-append
    assert spill.take(100) == records
    assert [(record.name, record.levelno, record.getMessage()) for record in caplog.records
            if "unreadable" in record.getMessage()] == [
        ("storage.spill", logging.ERROR, f"call=- [STORAGE] spilled line unreadable; dropped file={spill.path} "
         "error='not a spilled record: JSONDecodeError: Unterminated string starting at: line 1 column 23 (char 22)'")]


def test_spill_files_are_utf8_under_any_locale(tmp_path):
    """A container started with LANG=C has an ASCII default encoding: callers' words in Hebrew must still spill."""
    script = textwrap.dedent("""
        import sys
        from datetime import datetime, timezone
        from storage.records import TranscriptTurnRecord
        from storage.spill import SpillFile
        at = datetime(2025, 3, 1, tzinfo=timezone.utc)
        said = [TranscriptTurnRecord("CA1", "user", "\\u05e9\\u05dc\\u05d5\\u05dd", at),
                TranscriptTurnRecord("CA1", "assistant", "caf\\u00e9", at)]
        SpillFile(sys.argv[1], "calls", instance="elsewhere-1-aa").append(said)
        ours = SpillFile(sys.argv[1], "calls")
        assert ours.claim_leftovers() == 2
        ours.prepend(ours.take(1))
        assert ours.take(10) == said
        print("taken back whole")
    """)
    ascii_locale = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    spilled = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=ascii_locale, capture_output=True,
                             text=True, cwd=Path(__file__).resolve().parent.parent, timeout=60)
    assert spilled.stdout == "taken back whole\n", spilled.stderr


def test_a_spill_directory_not_yet_made_is_made_with_its_parents(tmp_path):
    records = simulated_call("CA1")
    appended = SpillFile(tmp_path / "spill" / "calls", "calls")
    appended.append(records[:1])
    prepended = SpillFile(tmp_path / "other" / "calls", "calls")
    prepended.prepend(records[1:2])
    assert appended.take(10) == records[:1] and prepended.take(10) == records[1:2]


def test_taking_from_a_spill_file_never_written_takes_nothing(tmp_path):
    spill = SpillFile(tmp_path, "calls")
    assert spill.take(10) == [] and spill.is_empty()
    spill.path.write_text("{")
    assert not spill.is_empty()


def test_a_leftover_torn_mid_append_costs_only_its_torn_line(tmp_path, caplog):
    records = simulated_call("CA1")
    dead = SpillFile(tmp_path, "calls", instance="elsewhere-1-aa")
    dead.append(records[:2])
    with dead.path.open("a") as file:
        file.write('{"type": "CallEnded", "fie')  # the process died mid-append
    ours = SpillFile(tmp_path, "calls")
    assert ours.claim_leftovers() == 3
    ours.append(records[2:])
    # The torn line ends where it was cut: the records appended after it stay lines of their own.
    assert ours.take(100) == records
    assert len([record for record in caplog.records if "unreadable" in record.getMessage()]) == 1


def test_leftovers_listed_but_gone_before_their_claim_are_passed_over(tmp_path, monkeypatch):
    """Another process starting at once claims or clears some files between our listing and our rename."""
    records = simulated_call("CA1")
    first = SpillFile(tmp_path, "calls", instance="a-1-aa")
    first.append(records[:1])
    cut_short = tmp_path / "calls.b-1-bb.jsonl.staged"
    cut_short.write_text("a rewrite that never replaced its file\n")
    last = SpillFile(tmp_path, "calls", instance="c-1-cc")
    last.append(records[1:2])
    owner_is_alive = storage.spill._owner_is_alive

    def claimed_elsewhere_first(name: str) -> bool:
        if name in (first.path.name, cut_short.name):
            (tmp_path / name).unlink()
        return owner_is_alive(name)

    monkeypatch.setattr(storage.spill, "_owner_is_alive", claimed_elsewhere_first)
    ours = SpillFile(tmp_path, "calls", instance="z-1-zz")
    assert ours.claim_leftovers() == 1
    assert ours.take(10) == records[1:2]


def test_leftovers_of_dead_instances_are_claimed_and_those_of_live_ones_left(tmp_path):
    records = simulated_call("CA1")
    dead = SpillFile(tmp_path, "calls", instance=f"{SpillFile(tmp_path, 'x').instance.rsplit('-', 2)[0]}-999999-aa")
    other_host = SpillFile(tmp_path, "calls", instance="elsewhere-1-bb")
    alive = SpillFile(tmp_path, "calls", instance=f"{dead.instance.rsplit('-', 2)[0]}-{os.getppid()}-cc")
    statuses = SpillFile(tmp_path, "whatsapp-statuses", instance="elsewhere-1-dd")
    dead.append(records[:2])
    other_host.append(records[2:4])
    alive.append(records[4:])
    statuses.append([WhatsappStatusRecord("wamid.1", "sent", None)])
    (tmp_path / f"calls.{dead.instance}.jsonl.staged").write_text("a rewrite that never replaced its file\n")
    ours = SpillFile(tmp_path, "calls")
    assert ours.claim_leftovers() == 4
    # Each file keeps its order; files of different processes hold different calls.
    assert ours.take(100) == records[2:4] + records[:2]
    assert alive.take(100) == records[4:]
    assert sorted(path.name for path in tmp_path.iterdir()) == [statuses.path.name]


def test_a_host_name_with_dots_and_dashes_still_tells_live_instances_from_dead_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(storage.spill.socket, "gethostname", lambda: "ip-10-0-0-1.ec2.internal")
    records = simulated_call("CA1")
    dead = SpillFile(tmp_path, "calls", instance=f"{storage.spill._host_name()}-999999-aa")
    alive = SpillFile(tmp_path, "calls", instance=f"{storage.spill._host_name()}-{os.getppid()}-bb")
    dead.append(records[:2])
    alive.append(records[2:])
    ours = SpillFile(tmp_path, "calls")
    assert ours.instance.count(".") == 0
    assert ours.claim_leftovers() == 2 and ours.take(100) == records[:2]
    assert alive.take(100) == records[2:]


def test_an_earlier_run_under_our_own_pid_is_not_us(tmp_path):
    """A restarted container runs as pid 1 again: its last run's file is a leftover, not ours."""
    records = simulated_call("CA1")
    earlier = SpillFile(tmp_path, "calls", instance=f"{SpillFile(tmp_path, 'x').instance.rsplit('-', 1)[0]}-ee")
    earlier.append(records)
    assert SpillFile(tmp_path, "calls").claim_leftovers() == len(records)


def spilling_writer(database, tmp_path, *, capacity: int) -> StorageWriter:
    return StorageWriter(database, capacity=capacity, spill=SpillFile(tmp_path / "spill", "calls"))


async def until_logged(caplog, level: int, text: str) -> None:
    with trio.fail_after(HANG_GUARD_S):
        while not any(text in line for line in storage_log_lines(caplog, level)):
            await trio.sleep(0.01)


async def test_past_capacity_records_spill_to_disk_and_come_back_in_order_once_the_database_answers(
        database, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="storage.writer")
    monkeypatch.setattr(storage.writer, "RETRY_BASE_DELAY_S", 0.01)
    writer = spilling_writer(database, tmp_path, capacity=3)
    calls = [simulated_call(f"CA{number}") for number in range(3)]
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        for record in calls[0]:
            writer.submit(record)
        await until_logged(caplog, logging.WARNING, "database write failed; retrying")
        for record in calls[1] + calls[2]:
            writer.submit(record)
        # The database is still gone: memory holds the bound, the disk the rest.
        with trio.fail_after(HANG_GUARD_S):
            while writer._to_spill:
                await trio.sleep(0.01)
        assert writer.queued_count == 3 and writer.spilling
        assert len(writer._spill.path.read_text().splitlines()) == 21 - 3
        apply_migrations(database)
        with trio.fail_after(HANG_GUARD_S):
            while writer.spilling or writer.queued_count:
                await trio.sleep(0.01)
        writer.submit(CallEventRecord("CA0", "dtmf", calls[0][0].started_at, {"digit": "1"}))
        await flush(writer)
        assert writer.queued_count == 0 and not writer._spill.path.exists()
        nursery.cancel_scope.cancel()

    # In order: had an event gone in before its call, its foreign key would have failed and it would be missing.
    assert Call.select().where(Call.end_reason == "caller_hung_up").count() == 3
    assert CallEvent.select().count() == 3 * 3 + 1 and TranscriptTurn.select().count() == 3 * 2
    assert not storage_log_lines(caplog, logging.ERROR)
    spill_file = writer._spill.path
    assert [line for line in storage_log_lines(caplog, logging.WARNING) if "spill" in line] == [
        f"call=CA0 [STORAGE] writer queue full; spilling records to disk queued=3 file={spill_file}"]
    assert "call=- [STORAGE] spill file written back; queueing in memory again" in storage_log_lines(caplog, logging.INFO)


def refuse_spills(writer, monkeypatch, refusals: list[OSError]):
    """The writer's spill file raises each of `refusals` in turn, then appends; returns what is left of them."""
    append = writer._spill.append
    left = iter(refusals)

    def full_disk_then_room(records):
        refusal = next(left, None)
        if refusal is not None:
            raise refusal
        append(records)

    monkeypatch.setattr(writer._spill, "append", full_disk_then_room)
    return left


async def test_a_disk_that_refuses_the_spill_is_retried_until_it_takes_every_record(
        database, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="storage.writer")
    monkeypatch.setattr(storage.writer, "RETRY_BASE_DELAY_S", 0.01)
    writer = spilling_writer(database, tmp_path, capacity=2)
    refuse_spills(writer, monkeypatch, [OSError(28, "No space left on device"), OSError(5, "Input/output error")])
    records = simulated_call("CA1")[:3] + simulated_call("CA2")  # the lines name the oldest waiting's call
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        for record in records:
            writer.submit(record)
        # Nothing more is submitted: the retries alone must get the records onto the disk.
        with trio.fail_after(HANG_GUARD_S):
            while writer._to_spill:
                await trio.sleep(0.01)
        assert writer._spill.take(100) == records[2:]
        nursery.cancel_scope.cancel()
    spill_errors = [line for line in storage_log_lines(caplog, logging.ERROR) if "spill" in line]
    assert spill_errors == [
        "call=CA1 [STORAGE] spill file write failed; retrying records=8 attempt=1 error='[Errno 28] No space left on device'",
        "call=CA1 [STORAGE] spill file write failed; retrying records=8 attempt=2 error='[Errno 5] Input/output error'"]


async def test_flush_waits_for_records_still_on_their_way_to_a_refusing_disk(migrated_database, tmp_path, monkeypatch):
    monkeypatch.setattr(storage.writer, "RETRY_BASE_DELAY_S", 0.05)
    writer = spilling_writer(migrated_database, tmp_path, capacity=2)
    refusals = refuse_spills(writer, monkeypatch, [OSError(28, "No space left on device")] * 3)
    records = simulated_call("CA1")
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        for record in records:
            writer.submit(record)
        await flush(writer)
        # The database took the two in memory long before the disk took the rest: flush waited for those too.
        assert not writer._to_spill and next(refusals, None) is None
        nursery.cancel_scope.cancel()


async def test_what_the_database_cannot_take_by_shutdown_is_written_by_the_next_start(database, tmp_path, caplog,
                                                                                      monkeypatch):
    caplog.set_level(logging.INFO, logger="storage.writer")
    monkeypatch.setattr(storage.writer, "RETRY_BASE_DELAY_S", 0.01)
    give_up_after(10, monkeypatch)
    first_run = spilling_writer(database, tmp_path, capacity=4)
    calls = [simulated_call(f"CA{number}") for number in range(2)]
    async with trio.open_nursery() as nursery:
        await nursery.start(first_run.run)
        for record in calls[0] + calls[1]:
            first_run.submit(record)
        await until_logged(caplog, logging.WARNING, "attempt=1")
        nursery.cancel_scope.cancel()
    assert storage_log_lines(caplog, logging.WARNING)[-1] == (
        f"call=- [STORAGE] records kept in the spill file for the next start file={first_run._spill.path} "
        "unwritten_at_shutdown=4")
    assert not any("lost" in line for line in storage_log_lines(caplog, logging.ERROR))
    assert [first_run._spill.take(100)] == [calls[0] + calls[1]]  # the queued four ahead of the ten spilled
    first_run._spill.append(calls[0] + calls[1])

    monkeypatch.undo()
    apply_migrations(database)
    next_start = spilling_writer(database, tmp_path, capacity=4)
    async with trio.open_nursery() as nursery:
        await nursery.start(next_start.run)
        with trio.fail_after(HANG_GUARD_S):
            while next_start.spilling or next_start.queued_count:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert Call.select().where(Call.end_reason == "caller_hung_up").count() == 2
    assert CallEvent.select().count() == 6 and TranscriptTurn.select().count() == 4
    assert list((tmp_path / "spill").iterdir()) == []
    assert "call=- [STORAGE] spilled records of an earlier run found; writing them records=14" in storage_log_lines(
        caplog, logging.WARNING)


def test_call_records_and_whatsapp_statuses_spill_to_files_of_their_own_under_one_bound(tmp_path):
    writers = StorageWriters.spilling_to(None, tmp_path, capacity=7)
    assert [(name, writer._capacity, writer._spill.path.parent, writer._spill.path.name.split(".")[0])
            for name, writer in writers.named()] == [
        ("calls", 7, tmp_path, "calls"), ("whatsapp statuses", 7, tmp_path, "whatsapp-statuses")]
    assert writers.named()[0][1] is writers.calls and writers.named()[1][1] is writers.statuses


async def test_a_burst_of_delivery_callbacks_never_holds_up_a_calls_records(migrated_database, tmp_path, monkeypatch):
    real_write = storage.writer.write_batch_on_a_live_connection
    statuses_may_finish = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def write(database, batch):
        if isinstance(batch[0], WhatsappStatusRecord):
            trio.from_thread.run(statuses_may_finish.wait, trio_token=token)
        return real_write(database, batch)

    monkeypatch.setattr(storage.writer, "write_batch_on_a_live_connection", write)
    writers = StorageWriters.spilling_to(migrated_database, tmp_path, capacity=100)
    async with trio.open_nursery() as nursery:
        for _, writer in writers.named():
            await nursery.start(writer.run)
        for number in range(1000):
            writers.statuses.submit(WhatsappStatusRecord(f"wamid.{number}", "delivered", None))
        for record in simulated_call("CA1"):
            writers.calls.submit(record)
        await flush(writers.calls)
        assert writers.statuses.queued_count == 100 and writers.statuses.spilling
        statuses_may_finish.set()
        await flush(writers.statuses)
        nursery.cancel_scope.cancel()
    assert Call.get(Call.call_sid == "CA1").end_reason == "caller_hung_up"
