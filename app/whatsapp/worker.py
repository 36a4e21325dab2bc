"""Broadcast workers: thin trio loops around the dispatch functions, which run in threads.

A worker claims a batch with reserved send slots, sends each message at its slot over one pooled
client, and records each result; it re-reads the broadcast's status at least every second, so a
pause or cancel stops it within a second and its unsent claims go back to the queue.
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
from app.whatsapp.sender import OutcomeUnknown, new_client, post_message, retry_delay_s
from storage.models import utc_now

logger = logging.getLogger("callgate.broadcast")

STATUS_POLL_S = 0.5  # pause and cancel take effect within a second
IDLE_POLL_S = 0.5
MAX_IN_FLIGHT = 64
MAX_BATCH = 200


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

    def log(self, message: str, *, level: int = logging.INFO, **fields: object) -> None:
        log_event(logger, "-", "BROADCAST", message, level=level, broadcast=self.broadcast_id, worker=self.worker_id,
                  **fields)

    async def run(self) -> str:
        """Send until done, paused or cancelled; returns the broadcast's status then."""
        batch_size = max(1, min(MAX_BATCH, int(self.options.rate_per_second) if not dispatch.unlimited(
            self.options.rate_per_second) else MAX_BATCH))
        async with new_client(MAX_IN_FLIGHT, self.settings.broadcast_lease_s) as client, trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_status)
            in_flight = trio.CapacityLimiter(MAX_IN_FLIGHT)
            while self._status == "running":
                await trio.to_thread.run_sync(dispatch.expire_leases, self.broadcast_id, utc_now())
                claimed = await trio.to_thread.run_sync(
                    dispatch.claim, self.broadcast_id, self.worker_id, batch_size, self.settings.broadcast_lease_s,
                    utc_now())
                if claimed:
                    for recipient in claimed:
                        await in_flight.acquire_on_behalf_of(recipient.recipient_id)
                        nursery.start_soon(self._send_one, client, recipient, in_flight)
                    # Keep claims about one batch ahead of the slots, not the whole broadcast.
                    await trio.sleep_until(_trio_time_of(claimed[-1].send_at) - 1.0)
                    continue
                wait_s = await trio.to_thread.run_sync(dispatch.seconds_until_next_due, self.broadcast_id, utc_now())
                if wait_s is None:
                    break
                await trio.sleep(min(max(wait_s, 0.05), IDLE_POLL_S))
            nursery.cancel_scope.cancel()
        return await self._wind_up()

    async def _wind_up(self) -> str:
        status = await trio.to_thread.run_sync(dispatch.status_of, self.broadcast_id)
        if status == "running":
            status = await trio.to_thread.run_sync(dispatch.finish, self.broadcast_id, utc_now())
        self.log("worker stopped", status=status)
        return status

    async def _watch_status(self) -> None:
        while True:
            await trio.sleep(STATUS_POLL_S)
            self._status = await trio.to_thread.run_sync(dispatch.status_of, self.broadcast_id)

    async def _send_one(self, client, recipient: ClaimedRecipient, in_flight: trio.CapacityLimiter) -> None:
        try:
            try:
                await trio.sleep_until(_trio_time_of(recipient.send_at))
            except trio.Cancelled:
                with trio.CancelScope(shield=True):  # stopped before sending: the claim goes back to the queue
                    await trio.to_thread.run_sync(dispatch.release, recipient)
                raise
            if self._status != "running":
                await trio.to_thread.run_sync(dispatch.release, recipient)
                return
            with trio.CancelScope(shield=True):  # once the request may be on the wire, its result must be kept
                outcome = await post_message(client, self._url, self.settings.whatsapp_access_token, recipient.body)
                await self._record(recipient, outcome)
        finally:
            in_flight.release_on_behalf_of(recipient.recipient_id)

    async def _record(self, recipient: ClaimedRecipient, outcome) -> None:
        match outcome:
            case Sent(message_id):
                await trio.to_thread.run_sync(dispatch.record_sent, recipient, message_id, utc_now())
                self._on_result("sent")
            case RetryLater(code, message) if recipient.attempts <= self.options.max_retries:
                due = utc_now() + timedelta(seconds=retry_delay_s(recipient.attempts, self._rng))
                await trio.to_thread.run_sync(dispatch.record_retry, recipient, code, message, due)
                self.log("send will be retried", level=logging.WARNING, code=code, attempt=recipient.attempts)
            case RetryLater(code, message) | Rejected(code, message):
                await trio.to_thread.run_sync(dispatch.record_failed, recipient, code, message)
                self._on_result("failed")
            case TokenRejected(code, message):
                await trio.to_thread.run_sync(dispatch.release, recipient)
                reason = f"access token refused by the Cloud API (code {code}): {message}"
                await trio.to_thread.run_sync(dispatch.pause, self.broadcast_id, reason)
                self._status = "paused"
                self.log("broadcast paused", level=logging.ERROR, why=reason)
            case OutcomeUnknown(reason):
                await trio.to_thread.run_sync(dispatch.record_unknown, recipient, reason)
                self._on_result("unknown")
                self.log("send outcome unknown; not resent", level=logging.WARNING, why=reason)
