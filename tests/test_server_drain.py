"""Stopping the server without dropping calls: SIGTERM turns new calls away, lets running ones finish
within the drain, has the rest say a closing line, writes every record and exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from functools import partial

import trio

from app.carriers import twilio
from app.carriers.simulated_twilio import SimulatedPhone, post_voice_webhook, run_phone_call
from app.server import serve
from app.settings import Settings
from storage.db import open_database
from storage.models import Call, CallEvent, TranscriptTurn


def talk_for(seconds: float):
    async def script(phone, elapsed_s):
        await trio.sleep(seconds)
    return script


def stored_calls(database_url: str) -> dict:
    database = open_database(database_url)
    with database.bind_ctx([Call, CallEvent, TranscriptTurn]):
        calls = {call.call_sid: (call.end_reason, call.ended_at is not None,
                                 [event.kind for event in CallEvent.select().where(CallEvent.call == call)])
                 for call in Call.select()}
    database.close()
    return calls


async def test_a_drain_lets_short_calls_finish_closes_long_ones_and_turns_new_ones_away(tmp_path, autojump_clock):
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'calls.db'}", spill_dir=str(tmp_path / "spill"), port=0, drain_s=12.0)
    terminated = trio.Event()
    phones = {"CA" + "1" * 32: SimulatedPhone(seed=1), "CA" + "2" * 32: SimulatedPhone(seed=2)}
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve, settings, terminated=terminated))
        for (call_sid, phone), seconds in zip(phones.items(), (15.0, 120.0)):
            nursery.start_soon(run_phone_call, "127.0.0.1", port, call_sid, talk_for(seconds), phone)
        await trio.sleep(5.0)
        terminated.set()
        drain_started_at = trio.current_time()
        await trio.sleep(0.1)
        turned_away = await post_voice_webhook("127.0.0.1", port, {"CallSid": "CA" + "3" * 32}, {})
    served_for_s = trio.current_time() - drain_started_at  # serve() returned: every call over, records written

    assert turned_away == twilio.twiml_reject_busy()
    assert stored_calls(settings.database_url) == {
        "CA" + "1" * 32: ("carrier_stop", True, ["first_utterance_end"]),
        "CA" + "2" * 32: ("shutdown", True, ["first_utterance_end", "closing"]),
    }
    # The long call: the drain's 12 s, then its closing line (the local model's 14.3 s answer) heard whole.
    hung_up_at = next(at for at, what in phones["CA" + "2" * 32].timeline.events if what == "server hung up")
    assert 5.0 + 12.0 + 14.2 < hung_up_at and served_for_s < 12.0 + 20.0 + 1.0


async def test_sigterm_to_a_real_server_drains_its_call_writes_its_records_and_exits_0(tmp_path):
    database_url = f"sqlite:///{tmp_path / 'calls.db'}"
    environment = {**os.environ, "DATABASE_URL": database_url, "CALLGATE_PORT": "0", "CALLGATE_DRAIN_S": "30"}
    async with trio.open_nursery() as nursery:
        server = await nursery.start(partial(
            trio.run_process, [sys.executable, "-m", "app.cli", "serve", "--dev"], env=environment, stderr=subprocess.PIPE,
            check=False))
        listening = trio.Event()
        ports = []

        async def read_the_log():  # to its end: a full pipe would stall the server
            async for line in lines_of(server.stderr):
                if "[SERVER] listening" in line:
                    ports.append(json.loads(line.split("listening ", 1)[1])["port"])
                    listening.set()

        nursery.start_soon(read_the_log)
        with trio.fail_after(30):
            await listening.wait()
        phone = SimulatedPhone(seed=4)
        nursery.start_soon(run_phone_call, "127.0.0.1", ports[0], "CA" + "4" * 32, talk_for(3.0), phone)
        await trio.sleep(1.0)
        server.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            status = await server.wait()
    assert status == 0
    assert stored_calls(database_url) == {"CA" + "4" * 32: ("carrier_stop", True, [])}
    assert not any(what == "server hung up" for _, what in phone.timeline.events)  # the caller hung up, not us


async def lines_of(stream):
    pending = b""
    while chunk := await stream.receive_some(65536):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.decode()


async def test_past_its_maximum_of_calls_the_server_turns_new_ones_away_busy(tmp_path, autojump_clock):
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'calls.db'}", spill_dir=str(tmp_path / "spill"), port=0, max_calls=1)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve, settings)
        nursery.start_soon(run_phone_call, "127.0.0.1", port, "CA" + "5" * 32, talk_for(5.0), SimulatedPhone(seed=5))
        await trio.sleep(1.0)
        turned_away = await post_voice_webhook("127.0.0.1", port, {"CallSid": "CA" + "6" * 32}, {})
        await trio.sleep(6.0)  # the first call is over: room again
        connected = await post_voice_webhook("127.0.0.1", port, {"CallSid": "CA" + "7" * 32}, {})
        nursery.cancel_scope.cancel()
    assert turned_away == twilio.twiml_reject_busy()
    assert "<Connect " in connected
