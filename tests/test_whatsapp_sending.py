"""Broadcasts sent through the real HTTP client to the local Cloud API sandbox: outcomes, rate, counters."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import trio

from app.settings import Settings
from app.whatsapp import dispatch
from app.whatsapp.sandbox_server import serve_sandbox
from app.whatsapp.worker import BroadcastWorker, SendOptions
from storage.models import (
    Business, WhatsappBroadcast, WhatsappBroadcastRecipient, counters_from_rows, recipient_status_counts, utc_now,
)
from tests.storage_fixtures import database, migrated_database_url as database_url  # noqa: F401 (fixtures: every test here starts migrated)

PHONES = [f"+9725023456{number:02d}" for number in range(10, 70)]


def new_broadcast(recipient_count: int, *, message_type: str = "template") -> int:
    business = Business.create(name="Acme", created_at=utc_now())
    broadcast = WhatsappBroadcast.create(
        business=business, name="spring", message_type=message_type, template_name="spring_sale",
        template_language="he", message_text="hello", total_recipients=recipient_count)
    WhatsappBroadcastRecipient.insert_many(
        [{"broadcast": broadcast.id, "business": business.id, "phone": phone} for phone in PHONES[:recipient_count]]
    ).execute()
    return broadcast.id


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def start_sandbox(nursery, record_path: Path, *, fail_spec: str = "", **settings: object) -> Settings:
    """The Cloud API sandbox on a free port in `nursery`; settings that send to it."""
    port = await nursery.start(lambda task_status: serve_sandbox(
        "127.0.0.1", 0, record_path=record_path, fail_spec=fail_spec, seed=3, task_status=task_status))
    return Settings(**{"whatsapp_api_base": f"http://127.0.0.1:{port}", "whatsapp_phone_number_id": "1065",
                       "whatsapp_access_token": "token", **settings})


async def send_through_sandbox(tmp_path, broadcast_id, *, fail_spec="", rate=0.0, lease_s=30.0, max_retries=3):
    record_path = tmp_path / "sandbox.jsonl"
    async with trio.open_nursery() as nursery:
        settings = await start_sandbox(nursery, record_path, fail_spec=fail_spec, broadcast_lease_s=lease_s)
        await trio.to_thread.run_sync(dispatch.start, broadcast_id, rate, utc_now())
        with trio.fail_after(60):  # a bound on hangs, not a timing assertion
            final = await BroadcastWorker(settings, broadcast_id, SendOptions(rate, max_retries)).run()
        nursery.cancel_scope.cancel()
    return final, records(record_path)


def assert_counters_equal_rows(broadcast_id: int) -> None:
    broadcast = WhatsappBroadcast.get_by_id(broadcast_id)
    assert {name: getattr(broadcast, name) for name in counters_from_rows(broadcast_id)} == counters_from_rows(
        broadcast_id)


async def test_every_recipient_gets_one_message_and_the_counters_match(database, tmp_path):
    broadcast_id = new_broadcast(40)
    final, sent = await send_through_sandbox(tmp_path, broadcast_id)
    assert final == "completed"
    assert sorted(message["to"] for message in sent) == sorted(phone.lstrip("+") for phone in PHONES[:40])
    assert sent[0]["template"] == {"name": "spring_sale", "language": {"code": "he"}}
    stored_ids = {row.message_id for row in WhatsappBroadcastRecipient.select()}
    assert stored_ids == {message["message_id"] for message in sent}
    assert_counters_equal_rows(broadcast_id)
    assert WhatsappBroadcast.get_by_id(broadcast_id).completed_at is not None


async def test_throttling_is_retried_until_each_message_goes_out_once(database, tmp_path, monkeypatch):
    monkeypatch.setattr("app.whatsapp.sender.RETRY_BASE_DELAY_S", 0.05)
    broadcast_id = new_broadcast(30)
    final, sent = await send_through_sandbox(tmp_path, broadcast_id, fail_spec="429:0.3,130429:0.2,500:0.1",
                                             max_retries=10)
    assert final == "completed"
    assert len(sent) == len({message["to"] for message in sent}) == 30
    assert max(row.attempts for row in WhatsappBroadcastRecipient.select()) > 1
    assert_counters_equal_rows(broadcast_id)


async def test_permanent_failures_fail_the_recipient_with_metas_code(database, tmp_path):
    broadcast_id = new_broadcast(10)
    final, sent = await send_through_sandbox(tmp_path, broadcast_id, fail_spec="131026:1.0")
    assert (final, sent) == ("failed", [])
    assert {row.error_code for row in WhatsappBroadcastRecipient.select()} == {131026}
    assert_counters_equal_rows(broadcast_id)


async def test_an_expired_token_pauses_the_broadcast_and_sends_nothing(database, tmp_path):
    broadcast_id = new_broadcast(10)
    final, sent = await send_through_sandbox(tmp_path, broadcast_id, fail_spec="190:1.0")
    assert (final, sent) == ("paused", [])
    assert "access token refused" in WhatsappBroadcast.get_by_id(broadcast_id).paused_reason
    assert recipient_status_counts(broadcast_id)["queued"] == 10


async def test_a_timeout_after_the_request_went_out_is_unknown_and_never_resent(database, tmp_path):
    broadcast_id = new_broadcast(5)
    final, sent = await send_through_sandbox(tmp_path, broadcast_id, fail_spec="timeout:1.0", lease_s=1.0)
    assert final == "failed"
    assert len(sent) == 5  # the sandbox took them all: a resend would deliver twice
    assert recipient_status_counts(broadcast_id)["unknown"] == 5
    assert dispatch.requeue_unknown(broadcast_id) == 5  # only --resend-unknown puts them back
    assert_counters_equal_rows(broadcast_id)


async def test_the_rate_limit_holds_at_the_provider(database, tmp_path):
    broadcast_id = new_broadcast(25)
    final, sent = await send_through_sandbox(tmp_path, broadcast_id, rate=20.0)
    assert final == "completed"
    received = sorted(message["received_at"] for message in sent)
    # 20 msg/s: any 1 s window holds at most 20 sends, plus one for the window's edges.
    assert max(sum(1 for at in received if start <= at < start + 1.0) for start in received) <= 21


async def test_settings_no_request_can_carry_pause_the_broadcast_and_claim_nobody_for_good(database, tmp_path):
    broadcast_id = new_broadcast(5)
    record_path = tmp_path / "sandbox.jsonl"
    async with trio.open_nursery() as nursery:
        settings = await start_sandbox(nursery, record_path, whatsapp_access_token="token\n")
        await trio.to_thread.run_sync(dispatch.start, broadcast_id, 0.0, utc_now())
        with trio.fail_after(60):
            final = await BroadcastWorker(settings, broadcast_id, SendOptions(0.0, 3)).run()
        nursery.cancel_scope.cancel()
    assert final == "paused"
    assert "no message can be sent with these settings" in WhatsappBroadcast.get_by_id(broadcast_id).paused_reason
    assert records(record_path) == []
    assert recipient_status_counts(broadcast_id)["queued"] == 5


async def operator_command(database_url: str, *arguments: object) -> float:
    """Run `callgate broadcast ...` as the operator would, in its own process; returns when it finished."""
    await trio.run_process([sys.executable, "-m", "app.cli", "broadcast", *map(str, arguments)],
                           env={**os.environ, "DATABASE_URL": database_url}, capture_stdout=True)
    return time.time()


async def stop_a_running_broadcast(tmp_path, database_url, broadcast_id: int, verb: str):
    """Send at 10 a second, run `verb` once a few messages are out; the worker's final status, sends, stop time."""
    record_path = tmp_path / "sandbox.jsonl"
    outcome = {}
    async with trio.open_nursery() as nursery:
        settings = await start_sandbox(nursery, record_path)
        await trio.to_thread.run_sync(dispatch.start, broadcast_id, 10.0, utc_now())

        async def work() -> None:
            outcome["final"] = await BroadcastWorker(settings, broadcast_id, SendOptions(10.0, 3)).run()

        with trio.fail_after(60):  # a bound on hangs, not a timing assertion
            async with trio.open_nursery() as working:
                working.start_soon(work)
                while len(records(record_path)) < 5:
                    await trio.sleep(0.05)
                outcome["stopped_at"] = await operator_command(database_url, verb, broadcast_id)
        nursery.cancel_scope.cancel()
    return outcome["final"], records(record_path), outcome["stopped_at"]


def assert_stopped_within_a_second(sent: list[dict], stopped_at: float, broadcast_id: int) -> None:
    assert 5 <= len(sent) < len(PHONES)
    assert [message["to"] for message in sent if message["received_at"] > stopped_at + 1.0] == []
    # Claimed but unsent rows went back to the queue: every recipient is either sent, once, or queued.
    counts = recipient_status_counts(broadcast_id)
    assert {status: count for status, count in counts.items() if count} == {
        "sent": len(sent), "queued": len(PHONES) - len(sent)}
    assert WhatsappBroadcastRecipient.select().where(WhatsappBroadcastRecipient.claimed_by.is_null(False)).count() == 0


async def test_pausing_a_running_broadcast_stops_its_worker_and_resuming_sends_the_rest_once(
        database, database_url, tmp_path):
    broadcast_id = new_broadcast(len(PHONES))
    final, sent, paused_at = await stop_a_running_broadcast(tmp_path, database_url, broadcast_id, "pause")
    assert final == "paused"
    assert_stopped_within_a_second(sent, paused_at, broadcast_id)
    assert_counters_equal_rows(broadcast_id)

    await operator_command(database_url, "resume", broadcast_id)
    assert WhatsappBroadcast.get_by_id(broadcast_id).status == "running"
    (tmp_path / "resumed").mkdir()
    final, rest = await send_through_sandbox(tmp_path / "resumed", broadcast_id)
    assert final == "completed"
    assert sorted(message["to"] for message in sent + rest) == sorted(phone.lstrip("+") for phone in PHONES)
    assert_counters_equal_rows(broadcast_id)


async def test_cancelling_a_running_broadcast_stops_its_worker_for_good(database, database_url, tmp_path):
    broadcast_id = new_broadcast(len(PHONES))
    final, sent, cancelled_at = await stop_a_running_broadcast(tmp_path, database_url, broadcast_id, "cancel")
    assert final == "cancelled"
    assert_stopped_within_a_second(sent, cancelled_at, broadcast_id)
    assert WhatsappBroadcast.get_by_id(broadcast_id).stopped_at is not None
