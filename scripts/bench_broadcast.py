"""Messages per second end to end through the Cloud API sandbox, and CPU ms per message; prints JSON.

Each run sends a fresh broadcast of `--recipients` with no rate limit by `callgate broadcast send
--rate 0 --workers N` in a throwaway PostgreSQL database, against `callgate whatsapp-sandbox` in
another process. The sender's CPU is the user+sys time of the send process and its worker
processes; the sandbox's, which shares the machine's cores with them, is reported beside it.

    python scripts/bench_broadcast.py --pg-url postgresql://user:pass@host:5432/db
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


from app.settings import Settings
from storage.db import open_database, run_outside_transaction
from storage.migrate import apply_migrations
from storage.models import Business, WhatsappBroadcast, WhatsappBroadcastRecipient, recipient_status_counts

PG_URL_VARIABLE = "CALLGATE_TEST_PG_URL"
SANDBOX_START_TIMEOUT_S = 15.0
SEND_TIMEOUT_S = 600.0
INSERT_BATCH_SIZE = 1000
TARGET_MESSAGES_PER_SECOND = 500  # with 3 workers, so the rate limit and not the sender is the bottleneck
_LISTENING = re.compile(r"url=http://127\.0\.0\.1:(\d+)")


def allocated_phones(count: int) -> list[str]:
    """Distinct Israeli mobile numbers in allocated ranges (phonenumbers rejects unallocated ones)."""
    return [f"+9725{2 + index // 10_000_000}{index % 10_000_000:07d}" for index in range(count)]


@contextmanager
def throwaway_database(server_url: str) -> Iterator[str]:
    name = f"callgate_bench_{uuid.uuid4().hex[:12]}"
    run_outside_transaction(server_url, f'CREATE DATABASE "{name}"')
    try:
        yield server_url.rsplit("/", 1)[0] + "/" + name
    finally:
        run_outside_transaction(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def sandbox_process(folder: Path) -> Iterator[tuple[str, int]]:
    """`callgate whatsapp-sandbox --port 0` in its own process; yields its base URL and pid once it listens."""
    log_path = folder / "sandbox.log"
    with open(log_path, "w") as log:
        sandbox = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "whatsapp-sandbox", "--port", "0",
             "--record", str(folder / "sent.jsonl")],
            stderr=log, env={**os.environ, "CALLGATE_LOG_LEVEL": "INFO"})
    try:
        deadline = time.monotonic() + SANDBOX_START_TIMEOUT_S
        while not (match := _LISTENING.search(log_path.read_text())):
            if sandbox.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the sandbox did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{match.group(1)}", sandbox.pid
    finally:
        sandbox.kill()
        sandbox.wait(timeout=10)


def create_broadcast(database_url: str, phones: list[str]) -> int:
    database = open_database(database_url)
    try:
        apply_migrations(database)
        with database.atomic():
            business = Business.create(name="bench")
            broadcast = WhatsappBroadcast.create(business=business, name="bench", message_type="template",
                                                 template_name="bench", template_language="en",
                                                 total_recipients=len(phones))
            for start in range(0, len(phones), INSERT_BATCH_SIZE):
                WhatsappBroadcastRecipient.insert_many(
                    [{"broadcast": broadcast.id, "business": business.id, "phone": phone}
                     for phone in phones[start:start + INSERT_BATCH_SIZE]]).execute()
        return broadcast.id
    finally:
        database.close()


def sent_count(database_url: str, broadcast_id: int) -> int:
    database = open_database(database_url)
    try:
        return recipient_status_counts(broadcast_id)["sent"]
    finally:
        database.close()


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def process_cpu_s(pid: int) -> float:
    """user+sys of a running process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_send(database_url: str, sandbox: tuple[str, int], broadcast_id: int, workers: int) -> dict:
    """One `broadcast send` to completion; its wall time, the CPU of it and its worker processes, and the sandbox's."""
    api_base, sandbox_pid = sandbox
    env = {**os.environ, "DATABASE_URL": database_url, "WHATSAPP_API_BASE": api_base,
           "WHATSAPP_PHONE_NUMBER_ID": "1065", "WHATSAPP_ACCESS_TOKEN": "bench", "CALLGATE_LOG_LEVEL": "WARNING"}
    command = [sys.executable, "-m", "app.cli", "broadcast", "send", str(broadcast_id), "--rate", "0",
               "--workers", str(workers)]
    cpu_before, sandbox_cpu_before = children_cpu_s(), process_cpu_s(sandbox_pid)
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, timeout=SEND_TIMEOUT_S)
    wall_s = time.perf_counter() - started
    cpu_s = children_cpu_s() - cpu_before
    sandbox_cpu_s = process_cpu_s(sandbox_pid) - sandbox_cpu_before
    sent = sent_count(database_url, broadcast_id)
    return {"workers": workers, "sent": sent, "seconds": round(wall_s, 2),
            "messages_per_second": round(sent / wall_s, 1), "cpu_ms_per_message": round(1000 * cpu_s / sent, 3),
            "sandbox_cpu_ms_per_message": round(1000 * sandbox_cpu_s / sent, 3)}


def medians_by_workers(runs: list[dict]) -> list[dict]:
    figures = ("messages_per_second", "cpu_ms_per_message", "sandbox_cpu_ms_per_message")
    return [{"workers": workers, **{figure: statistics.median(run[figure] for run in runs if run["workers"] == workers)
                                    for figure in figures}}
            for workers in sorted({run["workers"] for run in runs})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg-url", default=os.environ.get(PG_URL_VARIABLE),
                        help=f"a PostgreSQL server URL a database can be created on (default ${PG_URL_VARIABLE})")
    parser.add_argument("--recipients", type=int, default=10_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--repeats", type=int, default=3, help="runs per worker count; medians are reported")
    args = parser.parse_args()
    if not args.pg_url:
        parser.error(f"give --pg-url or set {PG_URL_VARIABLE}")
    phones = allocated_phones(args.recipients)
    runs = []
    with (tempfile.TemporaryDirectory() as folder, throwaway_database(args.pg_url) as database_url,
          sandbox_process(Path(folder)) as sandbox):
        for _ in range(args.repeats):
            for workers in args.workers:
                runs.append(run_send(database_url, sandbox, create_broadcast(database_url, phones), workers))
    print(json.dumps({"recipients": args.recipients, "rate_limit": None, "cpu_count": os.cpu_count(),
                      "python": platform.python_version(),
                      "target_messages_per_second_with_3_workers": TARGET_MESSAGES_PER_SECOND,
                      "seed_default_rate_limit": Settings().broadcast_rate_limit,
                      "medians": medians_by_workers(runs), "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
