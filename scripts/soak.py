"""Soak: call churn against a real `callgate serve` for a bounded time; prints JSON, exits 1 if anything grows.

The server runs as its own process (`serve --dev`: the local model, a SQLite database in a scratch
folder). Simulated phones place calls over real sockets in real time, `--concurrent` at once: the
standard call (greeting, question, barge-in), on every kind of line in turn, and every
`--fault-every`th call is a fault, in turn: the caller hangs up mid-answer without a `stop`, or the
carrier vanishes mid-answer (no frames, no close, nothing read, the socket left open), which the
server must end by itself as `carrier_silent`. Every `--sample-s` the
server's RSS and open descriptors are read from /proc, and the call records' backlog is counted:
calls that have ended at the phone but have no end in the database yet. After the churn the backlog
must drain and the server must exit 0 on SIGTERM.

A quantity grows when its mean over the last third of the samples exceeds its mean over the middle
third by more than its allowance (the first third is warm-up: caches, the allocator's arenas).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import math
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.carriers.simulated_twilio import PHONE_LINES, SimulatedPhone, run_phone_call  # noqa: E402
from app.simulate import StandardCall  # noqa: E402

RSS_ALLOWANCE_MB = 5.0
DESCRIPTOR_ALLOWANCE = 4
DRAIN_LIMIT_S = 30.0
FAULT_AFTER_S = 9.0
"""About two seconds into the answer: the greeting and the question take some seven."""
VANISHED_FOR_S = 12.0
"""How long a vanished carrier keeps its socket open: longer than the server's 5 s without media."""


@dataclass
class Churn:
    calls_placed: int = 0
    finished_call_sids: set[str] = field(default_factory=set)
    calls_failed: int = 0
    hang_ups: int = 0
    vanished_call_sids: set[str] = field(default_factory=set)
    failures: list[str] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def record_backlog(database_path: Path, finished_call_sids: set[str]) -> int:
    """Calls the phones have finished whose end the database does not hold yet."""
    if not database_path.exists():
        return len(finished_call_sids)
    with sqlite3.connect(f"file:{database_path}?mode=ro", uri=True, timeout=5) as database:
        try:
            ended = {row[0] for row in database.execute("SELECT call_sid FROM calls WHERE ended_at IS NOT NULL")}
        except sqlite3.OperationalError:  # the server has not made its tables yet
            ended = set()
    return len(finished_call_sids - ended)


async def wait_until_live(port: int, server: subprocess.Popen) -> None:
    with trio.fail_after(30):
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"callgate serve exited with {server.returncode} before it answered")
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.2)
                continue
            await stream.aclose()
            return


def vanishing_midway():
    """The standard call until FAULT_AFTER_S, then the carrier vanishes with its socket open."""
    async def script(phone: SimulatedPhone, elapsed_s) -> None:
        with trio.move_on_after(FAULT_AFTER_S):
            await StandardCall()(phone, elapsed_s)
        phone.vanish(elapsed_s())
        await trio.sleep_forever()
    return script


async def place_calls(port: int, numbers: itertools.count, churn: Churn, fault_every: int, stop_at: float) -> None:
    lines = list(PHONE_LINES.values())
    while trio.current_time() < stop_at:
        number = next(numbers)
        call_sid = f"CA{number:032x}"
        churn.calls_placed += 1
        phone = SimulatedPhone(line=lines[number % len(lines)])
        fault = fault_every > 0 and number % fault_every == fault_every - 1
        vanish = fault and (number // fault_every) % 2 == 1
        script = vanishing_midway() if vanish else StandardCall()
        try:
            with trio.move_on_after(FAULT_AFTER_S + VANISHED_FOR_S * vanish if fault else math.inf):
                await run_phone_call("127.0.0.1", port, call_sid, script, phone)
            churn.hang_ups += fault and not vanish
            if vanish:
                churn.vanished_call_sids.add(call_sid)
            churn.finished_call_sids.add(call_sid)
        except Exception as error:  # a failed call is a finding to report, not a reason to stop the soak
            churn.calls_failed += 1
            churn.failures.append(f"call {number}: {type(error).__name__}: {error}")


def end_reasons(database_path: Path, call_sids: set[str]) -> dict[str, int]:
    """How the database says these calls ended, counted by reason."""
    with sqlite3.connect(f"file:{database_path}?mode=ro", uri=True, timeout=5) as database:
        rows = database.execute("SELECT call_sid, end_reason FROM calls WHERE ended_at IS NOT NULL").fetchall()
    return dict(collections.Counter(reason for call_sid, reason in rows if call_sid in call_sids))


async def sample(pid: int, database_path: Path, churn: Churn, started: float, every_s: float,
                 samples: list[dict]) -> None:
    while True:
        backlog = await trio.to_thread.run_sync(record_backlog, database_path, set(churn.finished_call_sids))
        samples.append({
            "minute": round((trio.current_time() - started) / 60, 2),
            "rss_mb": round(rss_mb(pid), 1),
            "open_descriptors": open_descriptors(pid),
            "record_backlog": backlog,
            "calls_finished": len(churn.finished_call_sids),
        })
        await trio.sleep(every_s)


def slope_per_minute(samples: list[dict], key: str) -> float:
    minutes = [entry["minute"] for entry in samples]
    values = [entry[key] for entry in samples]
    mean_minute, mean_value = sum(minutes) / len(minutes), sum(values) / len(values)
    spread = sum((minute - mean_minute) ** 2 for minute in minutes)
    if spread == 0:
        return 0.0
    return sum((minute - mean_minute) * (value - mean_value) for minute, value in zip(minutes, values)) / spread


def growth(samples: list[dict], key: str, allowance: float) -> dict:
    third = len(samples) // 3
    middle, last = samples[third:2 * third], samples[2 * third:]
    middle_mean = sum(entry[key] for entry in middle) / len(middle)
    last_mean = sum(entry[key] for entry in last) / len(last)
    return {
        "slope_per_minute_after_warm_up": round(slope_per_minute(samples[third:], key), 3),
        "middle_third_mean": round(middle_mean, 2), "last_third_mean": round(last_mean, 2),
        "allowance": allowance, "grows": last_mean - middle_mean > allowance,
    }


async def soak(args: argparse.Namespace, scratch: Path) -> dict:
    port = free_port()
    database_path = scratch / "soak.db"
    environment = {**os.environ, "CALLGATE_HOST": "127.0.0.1", "CALLGATE_PORT": str(port),
                   "DATABASE_URL": f"sqlite:///{database_path}", "CALLGATE_LOG_LEVEL": "WARNING"}
    environment.pop("OPENAI_API_KEY", None)
    server_log = open(scratch / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--dev"], cwd=REPO, env=environment,
                              stdout=server_log, stderr=subprocess.STDOUT)
    churn, samples = Churn(), []
    try:
        await wait_until_live(port, server)
        started = trio.current_time()
        stop_at = started + args.minutes * 60
        numbers = itertools.count()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample, server.pid, database_path, churn, started, args.sample_s, samples)
            async with trio.open_nursery() as callers:
                for _ in range(args.concurrent):
                    callers.start_soon(place_calls, port, numbers, churn, args.fault_every, stop_at)
            with trio.move_on_after(DRAIN_LIMIT_S):
                while await trio.to_thread.run_sync(record_backlog, database_path, churn.finished_call_sids):
                    await trio.sleep(0.5)
            nursery.cancel_scope.cancel()
        backlog_after_drain = record_backlog(database_path, churn.finished_call_sids)
        server.send_signal(signal.SIGTERM)
        exit_code = server.wait(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
        server_log.close()
    server_errors = [line for line in (scratch / "server.log").read_text().splitlines() if " ERROR " in line
                     or "Traceback" in line]
    return {
        "minutes": args.minutes, "concurrent_calls": args.concurrent,
        "calls_placed": churn.calls_placed, "calls_finished": len(churn.finished_call_sids),
        "calls_failed": churn.calls_failed, "caller_hang_ups_mid_answer": churn.hang_ups,
        "carriers_vanished_mid_answer": len(churn.vanished_call_sids),
        "vanished_calls_by_end_reason": end_reasons(database_path, churn.vanished_call_sids),
        "failures": churn.failures[:10],
        "rss_mb": growth(samples, "rss_mb", RSS_ALLOWANCE_MB),
        "open_descriptors": growth(samples, "open_descriptors", DESCRIPTOR_ALLOWANCE),
        "record_backlog": {"max_during_churn": max(entry["record_backlog"] for entry in samples),
                           "after_drain": backlog_after_drain},
        "server_exit_code_after_sigterm": exit_code,
        "server_error_lines": server_errors[:10],
        "samples": samples,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrent", type=int, default=4, help="calls in progress at once")
    parser.add_argument("--fault-every", type=int, default=5, help="every Nth call is a fault: a hang-up or a vanished carrier, in turn (0: none)")
    parser.add_argument("--sample-s", type=float, default=10.0)
    args = parser.parse_args()
    if args.minutes * 60 / args.sample_s < 3:
        parser.error("growth is judged on thirds of the samples: --minutes must hold at least 3 of --sample-s")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="callgate-soak-") as scratch:
        report = trio.run(soak, args, Path(scratch))
    report["wall_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(report, indent=2))
    healthy = (not report["rss_mb"]["grows"] and not report["open_descriptors"]["grows"]
               and report["record_backlog"]["after_drain"] == 0 and report["calls_failed"] == 0
               and report["server_exit_code_after_sigterm"] == 0
               and report["vanished_calls_by_end_reason"] in ({}, {"carrier_silent": report["carriers_vanished_mid_answer"]}))
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
