"""Broadcast workers: thin trio loops around the dispatch functions, which run in threads.

A worker claims a batch with reserved send slots, sends each message at its slot over one pooled
client, and hands each result to one writer that records them a batch per transaction. It re-reads
the broadcast's status at least every second, so a pause or cancel stops it within a second and
its unsent claims go back to the queue.
"""

from __future__ import annotations

import logging
import os
import random
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable

import trio

from app.logs import log_event
from app.settings import Settings
from app.whatsapp import dispatch
from app.whatsapp.cloud_api import Rejected, RetryLater, Sent, TokenRejected, messages_url
from app.whatsapp.dispatch import ClaimedRecipient
from app.whatsapp.sender import NotSendable, OutcomeUnknown, new_client, post_message, retry_delay_s
from storage.models import utc_now

logger = logging.getLogger("callgate.broadcast")

STATUS_POLL_S = 0.5  # pause and cancel take effect within a second
IDLE_POLL_S = 0.5
MAX_IN_FLIGHT = 64
MAX_BATCH = 200
RESULTS_PER_TRANSACTION = 50
RESULTS_BUFFER = MAX_IN_FLIGHT  # senders wait for the writer rather than outrun their leases
MARK_SENDING_LEAD_S = 0.1
"""A row turns `sending` this long before its slot, so the database's round trip never delays the send
(and bunches sends past the rate); a worker killed meanwhile leaves it `unknown` though never sent."""


@dataclass(frozen=True)
class SendOptions:
    rate_per_second: float
    max_retries: int
    resend_unknown: bool = False


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{random.randrange(16**6):06x}"


def _trio_time_of(moment: datetime) -> float:
    return trio.current_time() + (moment - utc_now()).total_seconds()


class BroadcastWorker:
    """Sends one broadcast until nothing is left, as one of possibly several workers."""

    def __init__(self, settings: Settings, broadcast_id: int, options: SendOptions,
                 on_result: Callable[[str], None] = lambda outcome: None) -> None:
        self.settings = settings
        self.broadcast_id = broadcast_id
        self.options = options
        self.worker_id = new_worker_id()
        self._on_result = on_result
        self._url = messages_url(settings.whatsapp_api_base, settings.whatsapp_api_version,
                                 settings.whatsapp_phone_number_id)
        self._rng = random.Random()
        self._status = "running"
        self._pause_reason: str | None = None
        self._db_limiter = trio.CapacityLimiter(1)
        # Rows to mark `sending`, gathered while the previous batch of marks is in the database.
        self._to_mark: list[int] = []
        self._marks_written = trio.Event()
        self._marking = False
        self._marked: set[int] = set()

    def log(self, message: str, *, level: int = logging.INFO, **fields: object) -> None:
        log_event(logger, "-", "BROADCAST", message, level=level, broadcast=self.broadcast_id, worker=self.worker_id,
                  **fields)

    async def run(self) -> str:
        """Send until done, paused or cancelled; returns the broadcast's status then."""
        # About one second of slots a claim; unlimited, as many as can be in flight, so claims wait in no queue.
        batch_size = MAX_IN_FLIGHT if dispatch.unlimited(self.options.rate_per_second) else max(
            1, min(MAX_BATCH, int(self.options.rate_per_second)))
        results_in, results_out = trio.open_memory_channel[dispatch.RecipientResult](RESULTS_BUFFER)
        async with new_client(MAX_IN_FLIGHT, self.settings.broadcast_lease_s) as client, \
                trio.open_nursery() as recording:
            recording.start_soon(self._record_results, results_out)
            async with results_in, trio.open_nursery() as sending:
                sending.start_soon(self._watch_status)
                in_flight = trio.CapacityLimiter(MAX_IN_FLIGHT)
                while self._status == "running":
                    await self._in_db_thread(dispatch.expire_leases, self.broadcast_id, utc_now())
                    claimed = await self._in_db_thread(
                        dispatch.claim, self.broadcast_id, self.worker_id, batch_size,
                        self.settings.broadcast_lease_s, utc_now())
                    if claimed:
                        for recipient in claimed:
                            await in_flight.acquire_on_behalf_of(recipient.recipient_id)
                            sending.start_soon(self._send_one, client, recipient, in_flight, results_in)
                        # Keep claims about one batch ahead of the slots, not the whole broadcast.
                        await trio.sleep_until(_trio_time_of(claimed[-1].send_at) - 1.0)
                        continue
                    wait_s = await self._in_db_thread(dispatch.seconds_until_next_due, self.broadcast_id, utc_now())
                    if wait_s is None:
                        break
                    await trio.sleep(min(max(wait_s, 0.05), IDLE_POLL_S))
                sending.cancel_scope.cancel()
        return await self._wind_up()

    async def _in_db_thread(self, function: Callable, *args: object):
        # One database call at a time per worker: one connection, not one per thread trio happens to start.
        return await trio.to_thread.run_sync(function, *args, limiter=self._db_limiter)

    async def _wind_up(self) -> str:
        status = await self._in_db_thread(dispatch.status_of, self.broadcast_id)
        if status == "running":
            status = await self._in_db_thread(dispatch.finish, self.broadcast_id, utc_now())
        self.log("worker stopped", status=status)
        return status

    async def _watch_status(self) -> None:
        while True:
            await trio.sleep(STATUS_POLL_S)
            self._status = await self._in_db_thread(dispatch.status_of, self.broadcast_id)

    async def _send_one(self, client, recipient: ClaimedRecipient, in_flight: trio.CapacityLimiter,
                        results: trio.MemorySendChannel) -> None:
        try:
            send_at = _trio_time_of(recipient.send_at)
            try:
                await trio.sleep_until(send_at - MARK_SENDING_LEAD_S)
            except trio.Cancelled:
                with trio.CancelScope(shield=True):  # stopped before sending: the claim goes back to the queue
                    await results.send(dispatch.released(recipient))
                raise
            lease_ends = _trio_time_of(recipient.lease_expires_at)
            lease_s = self.settings.broadcast_lease_s
            if self._status != "running" or trio.current_time() > lease_ends - lease_s / 2:
                await results.send(dispatch.released(recipient))  # no request went out: safe to queue again
                return
            with trio.CancelScope(shield=True):  # once the request may be on the wire, its result must be kept
                if not await self._mark_sending(recipient):
                    self.log("claim lost before sending; not sent", level=logging.WARNING)
                    return
                await trio.sleep_until(send_at)
                outcome = OutcomeUnknown("no answer in time to record it within the claim's lease")
                with trio.move_on_at(lease_ends - lease_s / 4):
                    outcome = await post_message(client, self._url, self.settings.whatsapp_access_token,
                                                 recipient.body)
                await results.send(self._result_of(recipient, outcome))
        finally:
            in_flight.release_on_behalf_of(recipient.recipient_id)

    async def _mark_sending(self, recipient: ClaimedRecipient) -> bool:
        """True once the row is `sending` for this worker. Rows that come due together are marked in one
        transaction: one per send would hold back every send behind the database's round trips."""
        self._to_mark.append(recipient.recipient_id)
        written = self._marks_written
        if self._marking:
            await written.wait()
        else:
            self._marking = True
            while self._to_mark:
                batch, self._to_mark = self._to_mark, []
                done, self._marks_written = self._marks_written, trio.Event()
                self._marked |= await self._in_db_thread(dispatch.mark_sending, self.broadcast_id, batch,
                                                         self.worker_id)
                done.set()
            self._marking = False
        if recipient.recipient_id in self._marked:
            self._marked.discard(recipient.recipient_id)
            return True
        return False

    async def _record_results(self, results: trio.MemoryReceiveChannel) -> None:
        """Write results a batch per transaction until every sender is done, even when the worker is cancelled."""
        with trio.CancelScope(shield=True):
            async for first in results:
                batch = [first]
                while len(batch) < RESULTS_PER_TRANSACTION:
                    try:
                        batch.append(results.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):  # the last senders finished: write what came
                        break
                await self._in_db_thread(dispatch.record_results, self.broadcast_id, batch)
                for result in batch:
                    if result.status != "queued":
                        self._on_result(result.status)
                if self._pause_reason is not None and self._status == "running":
                    await self._in_db_thread(dispatch.pause, self.broadcast_id, self._pause_reason)
                    self._status = "paused"
                    self.log("broadcast paused", level=logging.ERROR, why=self._pause_reason)

    def _result_of(self, recipient: ClaimedRecipient, outcome) -> dispatch.RecipientResult:
        now = utc_now()
        match outcome:
            case Sent(message_id):
                return dispatch.sent(recipient, message_id, now)
            case RetryLater(code, message) if recipient.attempts <= self.options.max_retries:
                self.log("send will be retried", level=logging.WARNING, code=code, attempt=recipient.attempts)
                due = now + timedelta(seconds=retry_delay_s(recipient.attempts, self._rng))
                return dispatch.retry(recipient, code, message, now, due)
            case RetryLater(code, message) | Rejected(code, message):
                return dispatch.failed(recipient, code, message, now)
            case TokenRejected(code, message):
                self._pause_reason = f"access token refused by the Cloud API (code {code}): {message}"
                return dispatch.released(recipient, from_sending=True)
            case NotSendable(reason):
                self._pause_reason = f"no message can be sent with these settings: {reason}"
                return dispatch.released(recipient, from_sending=True)
            case OutcomeUnknown(reason):
                self.log("send outcome unknown; not resent", level=logging.WARNING, why=reason)
                return dispatch.unknown(recipient, reason, now)
        raise AssertionError(f"unhandled send outcome {outcome!r}")
