"""`callgate broadcast send ID` and `callgate broadcast worker`: the trio side of sending, with progress."""

from __future__ import annotations

import signal
import subprocess
import sys
from typing import TextIO

import trio

from app.http_client import split_url
from app.settings import Settings
from app.whatsapp.cloud_api import messages_url
from app.whatsapp.sender import check_sending_setup
from app.whatsapp import dispatch
from app.whatsapp.commands import EXIT_OK, CommandError, with_database
from app.whatsapp.worker import BroadcastWorker, SendOptions
from storage.db import database_proxy, is_sqlite
from storage.models import WhatsappBroadcast, recipient_status_counts, utc_now

EXIT_NOT_DELIVERED = 1
WORKER_SCAN_S = 1.0


def broadcast_send_command(
    settings: Settings, broadcast_id: int, *, rate: float | None, workers: int, resend_unknown: bool,
    out: TextIO | None = None, err: TextIO | None = None,
) -> int:
    """Mark the broadcast running and send until nothing is left; extra workers run as processes."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    options = SendOptions(rate_per_second=settings.broadcast_rate_limit if rate is None else rate,
                          max_retries=settings.broadcast_max_retries, resend_unknown=resend_unknown)

    def send() -> int:
        status = dispatch.status_of(broadcast_id)
        if status == "missing":
            raise CommandError(f"no broadcast with id {broadcast_id}")
        reopen = resend_unknown and status in dispatch.REOPENABLE_STATUSES
        if status not in ("pending", "running") and not reopen:
            raise CommandError(f"broadcast {broadcast_id} is {status}; only a pending or running one can be sent"
                               + (" (resume it first)" if status == "paused" else "")
                               + (" (or use --resend-unknown)" if status in dispatch.REOPENABLE_STATUSES else ""))
        _refuse_unusable_sending_settings(settings)
        process_count = workers
        if workers > 1 and is_sqlite(database_proxy.obj):
            print(f"SQLite allows one sending worker; running 1, not {workers}", file=err)
            process_count = 1
        if resend_unknown:
            print(f"{dispatch.requeue_unknown(broadcast_id)} recipients of unknown outcome queued again", file=out)
        dispatch.start(broadcast_id, options.rate_per_second, utc_now(), reopen=reopen)
        helpers = [_spawn_worker(broadcast_id) for _ in range(process_count - 1)]
        try:
            final = trio.run(_send_with_progress, settings, broadcast_id, options, out)
        finally:
            for helper in helpers:
                helper.wait()
        counts = recipient_status_counts(broadcast_id)
        print(f"broadcast {broadcast_id} {final}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n), file=out)
        return EXIT_OK if final in ("completed", "partial", "paused", "cancelled") else EXIT_NOT_DELIVERED

    return with_database(settings.database_url, err, send)


def _refuse_unusable_sending_settings(settings: Settings) -> None:
    """Settings no send could work with are refused before any recipient is claimed."""
    try:
        split_url(settings.whatsapp_api_base)
    except ValueError:
        raise CommandError(f"WHATSAPP_API_BASE must be an http(s) URL, got {settings.whatsapp_api_base!r}") from None
    if not (settings.whatsapp_phone_number_id.isascii() and settings.whatsapp_phone_number_id.isdigit()):
        raise CommandError("WHATSAPP_PHONE_NUMBER_ID must be the sending number's numeric id, "
                           f"got {settings.whatsapp_phone_number_id!r}")
    token = settings.whatsapp_access_token
    if not token:
        raise CommandError("WHATSAPP_ACCESS_TOKEN is not set")
    if not (token.isascii() and token.isprintable()) or " " in token:
        raise CommandError("WHATSAPP_ACCESS_TOKEN must be one word of printable ASCII (a stray newline or space?)")
    try:
        check_sending_setup(messages_url(settings.whatsapp_api_base, settings.whatsapp_api_version,
                                         settings.whatsapp_phone_number_id), token)
    except ValueError as error:
        raise CommandError(f"no message could be sent with these settings (WHATSAPP_*, HTTPS_PROXY): {error}") from None


def _spawn_worker(broadcast_id: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "app.cli", "broadcast", "worker", "--broadcast", str(broadcast_id)])


async def _send_with_progress(settings: Settings, broadcast_id: int, options: SendOptions, out: TextIO) -> str:
    total = sum(recipient_status_counts(broadcast_id).values())
    progress = _Progress(out, total)
    worker = BroadcastWorker(settings, broadcast_id, options, on_result=progress.advance)
    with progress:
        return await worker.run()


class _Progress:
    """A rich progress bar on a terminal; a plain line every 5% otherwise."""

    def __init__(self, out: TextIO, total: int) -> None:
        self._out = out
        self._total = max(total, 1)
        self._done = 0
        self._bar = None
        if out.isatty():
            from rich.progress import Progress

            self._bar = Progress()
            self._task = self._bar.add_task("sending", total=total)

    def __enter__(self) -> "_Progress":
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def advance(self, outcome: str) -> None:
        self._done += 1
        if self._bar is not None:
            self._bar.advance(self._task)
        elif self._done * 20 // self._total != (self._done - 1) * 20 // self._total or self._done == self._total:
            print(f"{self._done}/{self._total} done (last: {outcome})", file=self._out, flush=True)


def broadcast_worker_command(settings: Settings, *, only_broadcast: int | None, err: TextIO | None = None) -> int:
    """Keep sending every running broadcast (or only one, until it is done); stops cleanly on SIGTERM."""
    def work() -> int:
        _refuse_unusable_sending_settings(settings)
        trio.run(_work, settings, only_broadcast)
        return EXIT_OK

    return with_database(settings.database_url, err, work)


async def _work(settings: Settings, only_broadcast: int | None) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, signals, nursery.cancel_scope)
            if only_broadcast is not None:
                await _work_on(settings, only_broadcast)
                nursery.cancel_scope.cancel()
                return
            busy: set[int] = set()
            while True:
                for broadcast_id in await trio.to_thread.run_sync(dispatch.running_broadcast_ids):
                    if broadcast_id not in busy:
                        busy.add(broadcast_id)
                        nursery.start_soon(_work_on, settings, broadcast_id, busy)
                await trio.sleep(WORKER_SCAN_S)


async def _work_on(settings: Settings, broadcast_id: int, busy: set[int] | None = None) -> None:
    rate = await trio.to_thread.run_sync(_stored_rate, broadcast_id)
    options = SendOptions(rate_per_second=settings.broadcast_rate_limit if rate is None else rate,
                          max_retries=settings.broadcast_max_retries)
    await BroadcastWorker(settings, broadcast_id, options).run()
    if busy is not None:
        busy.discard(broadcast_id)


def _stored_rate(broadcast_id: int) -> float | None:
    broadcast = WhatsappBroadcast.get_or_none(WhatsappBroadcast.id == broadcast_id)
    return None if broadcast is None else broadcast.rate_per_second


async def _stop_on_signal(signals, scope: trio.CancelScope) -> None:
    async for _ in signals:
        scope.cancel()
        return
