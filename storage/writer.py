"""One writer task per process: the call path submits records, this task writes them in batches.

Peewee blocks, so every write runs in a worker thread; the audio path only appends to a deque.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import peewee
import trio

from app.logs import log_event
from storage.db import dropping_the_connection_on_failure, is_sqlite
from storage.models import Business, Call, CallEvent, TranscriptTurn, as_utc
from storage.records import (
    CallEnded, CallEventRecord, CallRecord, CallStarted, TranscriptTurnRecord, WhatsappStatusRecord,
)
from storage.delivery import apply_delivery_status
from storage.spill import SpillFile

logger = logging.getLogger(__name__)

BATCH_SIZE = 500
RETRY_BASE_DELAY_S = 0.5
RETRY_MAX_DELAY_S = 10.0
# At shutdown a dead database must not hold the process forever: give up after this many tries.
SHUTDOWN_ATTEMPTS = 3
STATEMENT_TIMEOUT_MS = 10_000


class UnknownCallError(LookupError):
    """A record names a call_sid that has no row in `calls`."""


class StorageWriter:
    """Queue call records from the call path and write them from one task.

    `submit()` never blocks. `run()` is the writer task; `flush()` waits for what was submitted.
    With a spill file the queue is bounded: past `capacity`, and for whatever the database could
    not take by shutdown, records go to the file, and come back from it once the queue is empty
    (in this run, or in the next start's). Without one, records over capacity stay in memory.
    """

    def __init__(self, database: peewee.Database, *, capacity: int = 10_000, spill: SpillFile | None = None) -> None:
        self._database = database
        self._capacity = capacity
        self._spill = spill
        # (submission number, record); a record taken back from the spill file has None: no flush waits for it.
        self._pending: deque[tuple[int | None, CallRecord]] = deque()
        self._to_spill: list[tuple[int, CallRecord]] = []
        # Once one record is spilled, later ones follow it to the file, so records are written in order.
        self._spilling = False
        self._spill_lock = trio.Lock()
        self._wakeup = trio.Event()
        self._spill_wakeup = trio.Event()
        self._submitted_count = 0
        self._flush_waiters: list[tuple[int, trio.Event]] = []
        self._over_capacity = False
        self._stopped = False

    @property
    def queued_count(self) -> int:
        return len(self._pending)

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def spilling(self) -> bool:
        return self._spilling

    def submit(self, record: CallRecord) -> None:
        """Queue `record` for writing; never blocks, never drops it."""
        if self._stopped:
            log_event(
                logger, record.log_id, "STORAGE", "record submitted after the writer stopped; it will not be written",
                level=logging.ERROR, record=type(record).__name__,
            )
        entry = (self._submitted_count, record)
        self._submitted_count += 1
        if self._spill is not None and (self._spilling or len(self._pending) >= self._capacity):
            self._start_spilling(record)
            self._to_spill.append(entry)
            self._spill_wakeup.set()
            return
        self._pending.append(entry)
        self._warn_once_over_capacity(record)
        self._wakeup.set()

    async def flush(self) -> None:
        """Return once every record submitted before this call is written, spilled, or logged as failed.

        Raises RuntimeError if the writer task has already stopped with records unwritten.
        Cancelling flush() leaves the records queued.
        """
        target = self._submitted_count
        if self._oldest_unfinished() >= target:
            await trio.lowlevel.checkpoint()
            return
        if self._stopped:
            raise RuntimeError("the storage writer has stopped; queued records cannot be written")
        written = trio.Event()
        self._flush_waiters.append((target, written))
        await written.wait()

    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Write records as they arrive until cancelled; first take over what earlier runs spilled.

        On cancellation it writes everything still queued, shielded, before returning; with a spill
        file, what the database will not take then goes to the file.
        """
        if self._spill is not None:
            await self._claim_leftovers()
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                if self._spill is not None:
                    nursery.start_soon(self._spill_as_submitted)
                await self._write_as_submitted()
        finally:
            with trio.CancelScope(shield=True):
                await self._write_pending(max_attempts=SHUTDOWN_ATTEMPTS)
                if self._spill is not None:
                    await self._spill_at_shutdown()
            self._stopped = True

    async def _write_as_submitted(self) -> None:
        while True:
            await self._write_pending(max_attempts=None)
            if self._spilling and not self._pending:
                await self._take_back_spilled()
                if self._pending:
                    continue
            await self._wakeup.wait()
            self._wakeup = trio.Event()

    async def _write_pending(self, *, max_attempts: int | None) -> None:
        while self._pending:
            # Records leave the deque only once written, so a cancellation here loses nothing.
            batch = [record for _, record in itertools.islice(self._pending, BATCH_SIZE)]
            if not await self._write_with_retries(batch, max_attempts):
                return
            for _ in batch:
                self._pending.popleft()
            self._wake_flush_waiters()

    async def _write_with_retries(self, batch: list[CallRecord], max_attempts: int | None) -> bool:
        """Write `batch`, retrying while the database fails; False once `max_attempts` failed (the batch stays queued)."""
        for attempt in itertools.count(1):
            try:
                failures = await trio.to_thread.run_sync(write_batch_on_a_live_connection, self._database, batch)
            except Exception as error:
                # Whatever fails here (the database, or a bug of ours) is retried: it must never end the calls.
                if max_attempts is not None and attempt >= max_attempts:
                    self._give_up_at_shutdown(error)
                    return False
                _log_batch_retry(batch, error, attempt)
                await trio.sleep(retry_delay_s(attempt))
                continue
            for record, error in failures:
                _log_record_failed(record, error)
            return True
        raise AssertionError("unreachable")

    def _give_up_at_shutdown(self, error: Exception) -> None:
        if self._spill is not None:
            return  # the spill file takes what is left
        for _, record in self._pending:
            _log_record_lost(record, error)
        self._pending.clear()
        self._wake_flush_waiters()

    async def _claim_leftovers(self) -> None:
        moved = await trio.to_thread.run_sync(self._spill.claim_leftovers)
        if moved:
            log_event(logger, "-", "STORAGE", "spilled records of an earlier run found; writing them",
                      level=logging.WARNING, records=moved)
        self._spilling = not await trio.to_thread.run_sync(self._spill.is_empty)

    async def _spill_as_submitted(self) -> None:
        while True:
            await self._spill_wakeup.wait()
            self._spill_wakeup = trio.Event()
            async with self._spill_lock:
                await self._append_to_spill()

    async def _append_to_spill(self) -> None:
        """Move what waits to be spilled into the file, retrying while the disk refuses."""
        for attempt in itertools.count(1):
            entries = self._to_spill
            if not entries:
                return
            try:
                await trio.to_thread.run_sync(self._spill.append, [record for _, record in entries])
            except OSError as error:
                log_event(logger, entries[0][1].log_id, "STORAGE", "spill file write failed; retrying",
                          level=logging.ERROR, records=len(entries), attempt=attempt, error=str(error))
                await trio.sleep(retry_delay_s(attempt))
                continue
            del self._to_spill[:len(entries)]
            self._wake_flush_waiters()

    async def _take_back_spilled(self) -> None:
        """The queue is empty: refill it with the oldest spilled records, then with those not yet on disk."""
        async with self._spill_lock:
            await self._append_to_spill()
            records = await trio.to_thread.run_sync(self._spill.take, self._capacity)
            self._pending.extend((None, record) for record in records)
            if await trio.to_thread.run_sync(self._spill.is_empty):
                # Records submitted while the file was read are newer than all of it.
                self._pending.extend(self._to_spill)
                self._to_spill = []
                self._spilling = False
                log_event(logger, "-", "STORAGE", "spill file written back; queueing in memory again")

    async def _spill_at_shutdown(self) -> None:
        """What the database did not take goes ahead of the file's records, what was on its way to it after them."""
        unwritten = [record for _, record in self._pending]
        if unwritten:
            await trio.to_thread.run_sync(self._spill.prepend, unwritten)
            self._pending.clear()
        await self._append_to_spill()
        if not await trio.to_thread.run_sync(self._spill.is_empty):
            log_event(logger, "-", "STORAGE", "records kept in the spill file for the next start",
                      level=logging.WARNING, file=str(self._spill.path), unwritten_at_shutdown=len(unwritten))

    def _start_spilling(self, record: CallRecord) -> None:
        if self._spilling:
            return
        self._spilling = True
        log_event(logger, record.log_id, "STORAGE", "writer queue full; spilling records to disk",
                  level=logging.WARNING, queued=len(self._pending), file=str(self._spill.path))

    def _oldest_unfinished(self) -> int:
        """The submission number of the oldest record neither written nor spilled; all are when it is the next one's."""
        for number, _ in itertools.chain(self._pending, self._to_spill):
            if number is not None:
                return number
        return self._submitted_count

    def _wake_flush_waiters(self) -> None:
        if len(self._pending) < self._capacity:
            self._over_capacity = False
        oldest_unfinished = self._oldest_unfinished()
        still_waiting = []
        for target, written in self._flush_waiters:
            if target <= oldest_unfinished:
                written.set()
            else:
                still_waiting.append((target, written))
        self._flush_waiters = still_waiting

    def _warn_once_over_capacity(self, record: CallRecord) -> None:
        if self._over_capacity or len(self._pending) <= self._capacity:
            return
        self._over_capacity = True
        log_event(
            logger, record.log_id, "STORAGE", "writer queue over capacity; keeping records in memory",
            level=logging.WARNING, queued=len(self._pending), capacity=self._capacity,
        )


@dataclass(frozen=True)
class StorageWriters:
    """Call records and WhatsApp delivery callbacks queue apart: a burst of callbacks never delays a call's records."""

    calls: StorageWriter
    statuses: StorageWriter

    @classmethod
    def spilling_to(cls, database: peewee.Database, directory: Path, *, capacity: int) -> "StorageWriters":
        return cls(
            StorageWriter(database, capacity=capacity, spill=SpillFile(directory, "calls")),
            StorageWriter(database, capacity=capacity, spill=SpillFile(directory, "whatsapp-statuses")),
        )

    def named(self) -> list[tuple[str, StorageWriter]]:
        return [("calls", self.calls), ("whatsapp statuses", self.statuses)]


def retry_delay_s(attempt: int) -> float:
    """Exponential backoff after the `attempt`th failed write, capped so a recovered database is noticed soon."""
    return min(RETRY_MAX_DELAY_S, RETRY_BASE_DELAY_S * 2 ** (attempt - 1))


def write_batch_on_a_live_connection(
        database: peewee.Database, batch: list[CallRecord]) -> list[tuple[CallRecord, Exception]]:
    """write_batch(), on a new connection next time if this one failed."""
    with dropping_the_connection_on_failure(database):
        return write_batch(database, batch)


def write_batch(database: peewee.Database, batch: list[CallRecord]) -> list[tuple[CallRecord, Exception]]:
    """Write `batch` in one transaction; a record that fails rolls back alone (savepoint).

    Returns the records that failed with their errors. Raises a peewee error when the database
    itself fails (unreachable, locked, its connection dead), in which case nothing of the batch is
    written.
    """
    failures = []
    with database.atomic():
        if not is_sqlite(database):
            # A table locked by someone else must not hold the writer (and the shutdown flush) forever.
            database.execute_sql(f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}")
        for record in batch:
            try:
                with database.atomic():
                    write_record(record)
            except (peewee.IntegrityError, peewee.DataError, UnknownCallError, TypeError, ValueError) as error:
                failures.append((record, error))
    return failures


def write_record(record: CallRecord) -> None:
    """Write one record through the models, which open_database() bound to the writer's database."""
    match record:
        case CallStarted():
            Call.insert(
                call_sid=record.call_sid, stream_sid=record.stream_sid, from_number=record.from_number,
                to_number=record.to_number, business=_known_business_id(record),
                started_at=as_utc(record.started_at),
            ).execute()
        case CallEventRecord():
            CallEvent.insert(
                call=record.call_sid, kind=record.kind, at=as_utc(record.at), detail=record.detail,
            ).execute()
        case TranscriptTurnRecord():
            TranscriptTurn.insert(
                call=record.call_sid, role=record.role, text=record.text, started_at=as_utc(record.started_at),
                truncated=record.truncated, heard_ms=record.heard_ms,
            ).execute()
        case CallEnded():
            _end_call(record)
        case WhatsappStatusRecord():
            apply_delivery_status(record)
        case _:
            raise TypeError(f"not a call record: {type(record).__name__}")


def _known_business_id(record: CallStarted) -> int | None:
    """A webhook URL naming a business that does not exist must not cost the call its records."""
    if record.business_id is None or Business.select().where(Business.id == record.business_id).exists():
        return record.business_id
    log_event(logger, record.call_sid, "STORAGE", "call names an unknown business; stored without one",
              level=logging.WARNING, business_id=record.business_id)
    return None


def _end_call(record: CallEnded) -> None:
    updated = (
        Call.update(ended_at=as_utc(record.ended_at), end_reason=record.end_reason)
        .where(Call.call_sid == record.call_sid)
        .execute()
    )
    if not updated:
        raise UnknownCallError(f"no call {record.call_sid} to end")


def _log_record_failed(record: CallRecord, error: Exception) -> None:
    log_event(
        logger, record.log_id, "STORAGE", "record not written",
        level=logging.ERROR, record=type(record).__name__, error=str(error).strip() or type(error).__name__,
    )


def _log_batch_retry(batch: list[CallRecord], error: Exception, attempt: int) -> None:
    log_event(
        logger, batch[0].log_id, "STORAGE", "database write failed; retrying",
        level=logging.WARNING, records=len(batch), attempt=attempt, error=str(error).strip(),
    )


def _log_record_lost(record: CallRecord, error: Exception) -> None:
    log_event(
        logger, record.log_id, "STORAGE", "record lost at shutdown: database unavailable",
        level=logging.ERROR, record=type(record).__name__, error=str(error).strip(),
    )
