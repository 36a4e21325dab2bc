"""One writer task per process: the call path submits records, this task writes them in batches.

Peewee blocks, so every write runs in a worker thread; the audio path only appends to a deque.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque

import peewee
import trio

from app.logs import log_event
from storage.db import dropping_the_connection_on_failure, is_sqlite
from storage.models import Business, Call, CallEvent, TranscriptTurn, as_utc
from storage.records import (
    CallEnded, CallEventRecord, CallRecord, CallStarted, TranscriptTurnRecord, WhatsappStatusRecord,
)
from storage.delivery import apply_delivery_status

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
    """

    def __init__(self, database: peewee.Database, *, capacity: int = 10_000) -> None:
        self._database = database
        self._capacity = capacity
        # Over capacity we keep queueing and warn: a lost call record is worse than memory growth.
        self._pending: deque[CallRecord] = deque()
        self._wakeup = trio.Event()
        self._submitted_count = 0
        self._finished_count = 0
        self._flush_waiters: list[tuple[int, trio.Event]] = []
        self._over_capacity = False
        self._stopped = False

    @property
    def queued_count(self) -> int:
        return len(self._pending)

    @property
    def capacity(self) -> int:
        return self._capacity

    def submit(self, record: CallRecord) -> None:
        """Queue `record` for writing; never blocks, never drops it."""
        if self._stopped:
            log_event(
                logger, record.log_id, "STORAGE", "record submitted after the writer stopped; it will not be written",
                level=logging.ERROR, record=type(record).__name__,
            )
        self._pending.append(record)
        self._submitted_count += 1
        self._warn_once_over_capacity(record)
        self._wakeup.set()

    async def flush(self) -> None:
        """Return once every record submitted before this call is written or logged as failed.

        Raises RuntimeError if the writer task has already stopped with records unwritten.
        Cancelling flush() leaves the records queued.
        """
        target = self._submitted_count
        if self._finished_count >= target:
            await trio.lowlevel.checkpoint()
            return
        if self._stopped:
            raise RuntimeError("the storage writer has stopped; queued records cannot be written")
        written = trio.Event()
        self._flush_waiters.append((target, written))
        await written.wait()

    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Write records as they arrive until cancelled.

        On cancellation it writes everything still queued, shielded, before returning.
        """
        task_status.started()
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                await self._write_pending(max_attempts=None)
        finally:
            with trio.CancelScope(shield=True):
                await self._write_pending(max_attempts=SHUTDOWN_ATTEMPTS)
            self._stopped = True

    async def _write_pending(self, *, max_attempts: int | None) -> None:
        while self._pending:
            # Records leave the deque only once written, so a cancellation here loses nothing.
            batch = list(itertools.islice(self._pending, BATCH_SIZE))
            await self._write_with_retries(batch, max_attempts)
            for _ in batch:
                self._pending.popleft()
            self._mark_finished(len(batch))

    async def _write_with_retries(self, batch: list[CallRecord], max_attempts: int | None) -> None:
        for attempt in itertools.count(1):
            try:
                failures = await trio.to_thread.run_sync(write_batch_on_a_live_connection, self._database, batch)
            except Exception as error:
                # Whatever fails here (the database, or a bug of ours) is retried: it must never end the calls.
                if max_attempts is not None and attempt >= max_attempts:
                    _log_records_lost(batch, error)
                    return
                _log_batch_retry(batch, error, attempt)
                await trio.sleep(retry_delay_s(attempt))
                continue
            for record, error in failures:
                _log_record_failed(record, error)
            return

    def _mark_finished(self, count: int) -> None:
        self._finished_count += count
        if len(self._pending) < self._capacity:
            self._over_capacity = False
        still_waiting = []
        for target, written in self._flush_waiters:
            if target <= self._finished_count:
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


def _log_records_lost(batch: list[CallRecord], error: Exception) -> None:
    for record in batch:
        log_event(
            logger, record.log_id, "STORAGE", "record lost at shutdown: database unavailable",
            level=logging.ERROR, record=type(record).__name__, error=str(error).strip(),
        )
