"""PostgreSQL failing under a real server with a call on the line: restarted mid-call, and unreachable at shutdown.

On the real clock: the database's own restart and reconnects take real time, and the phone streams
real-time frames through it.
"""

from __future__ import annotations

import os
import shlex
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio

from app.server import serve
from app.settings import Settings
from app.simulate import simulate_call
from storage.db import open_database
from storage.models import Call, CallEvent, TranscriptTurn
from tests.storage_fixtures import PG_REQUIRED_VARIABLE, postgres_database_url  # noqa: F401 (fixture)

RESTART_VARIABLE = "CALLGATE_TEST_PG_RESTART"
"""The command that restarts the PostgreSQL server of CALLGATE_TEST_PG_URL (CI: pg_ctlcluster 15 main restart)."""


CALL_SID = "CA" + "5" * 32


def restart_command() -> list[str]:
    command = os.environ.get(RESTART_VARIABLE, "")
    if not command:
        if os.environ.get(PG_REQUIRED_VARIABLE):
            pytest.fail(f"{PG_REQUIRED_VARIABLE} is set but {RESTART_VARIABLE} is not: the restart case would be skipped")
        pytest.skip(f"{RESTART_VARIABLE} is not set")
    return shlex.split(command)


def the_call(database_url: str, call_sid: str) -> tuple[Call, list[str], int]:
    database = open_database(database_url)
    try:
        with database.bind_ctx([Call, CallEvent, TranscriptTurn]):
            call = Call.get(Call.call_sid == call_sid)
            kinds = [event.kind for event in CallEvent.select().where(CallEvent.call == call_sid)]
            return call, kinds, TranscriptTurn.select().where(TranscriptTurn.call == call_sid).count()
    finally:
        database.close()


def settings_for(database_url: str, tmp_path) -> Settings:
    return Settings(database_url=database_url, spill_dir=str(tmp_path / "spill"), host="127.0.0.1", port=0)


async def simulate_call_while(fault, settings: Settings, call_sid: str, *, after_s: float):
    """The standard call (greeting, question, answer, barge-in) with `fault` striking `after_s` into it."""
    async with trio.open_nursery() as nursery:
        async def strike() -> None:
            await trio.sleep(after_s)
            await fault()
        nursery.start_soon(strike)
        return await simulate_call(settings, call_sid=call_sid)


def assert_the_whole_call_is_stored(database_url: str, call_sid: str) -> None:
    call, kinds, turns = the_call(database_url, call_sid)
    assert call.end_reason == "carrier_stop" and call.ended_at is not None
    assert sorted(kinds) == ["barge_in", "first_utterance_end"] and turns >= 2


async def test_a_postgresql_restart_mid_call_loses_no_record_and_the_call_goes_on(postgres_database_url, tmp_path):
    command = restart_command()
    report = await simulate_call_while(partial(trio.run_process, command), settings_for(postgres_database_url, tmp_path),
                                       CALL_SID, after_s=2.0)
    assert report.talk_over_ms is not None and report.talk_over_ms <= 240  # the barge-in after the restart worked
    assert_the_whole_call_is_stored(postgres_database_url, CALL_SID)


class TcpRelay:
    """A TCP relay in front of PostgreSQL that the test can take away: the database becomes unreachable."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._scope: trio.CancelScope | None = None

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as self._scope:
            listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
            self.port = listeners[0].socket.getsockname()[1]
            await trio.serve_listeners(self._relay, listeners, task_status=task_status)

    def take_away(self) -> None:
        self._scope.cancel()

    async def _relay(self, client: trio.SocketStream) -> None:
        async with client, await trio.open_tcp_stream("127.0.0.1", self.target_port) as server:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_pump, client, server, nursery.cancel_scope)
                nursery.start_soon(_pump, server, client, nursery.cancel_scope)


async def _pump(source: trio.SocketStream, sink: trio.SocketStream, done: trio.CancelScope) -> None:
    try:
        while data := await source.receive_some():
            await sink.send_all(data)
    except trio.BrokenResourceError:
        pass
    done.cancel()


@asynccontextmanager
async def relayed(database_url: str):
    """`database_url` reached through a TcpRelay; yields the relay and the URL that goes through it."""
    prefix, _, rest = database_url.rpartition("@")
    host_port, _, name = rest.partition("/")
    relay = TcpRelay(int(host_port.rpartition(":")[2] or 5432))
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run)
        yield relay, f"{prefix}@127.0.0.1:{relay.port}/{name}"
        nursery.cancel_scope.cancel()


async def test_records_the_database_cannot_take_at_shutdown_are_spilled_and_written_by_the_next_start(
        postgres_database_url, tmp_path, caplog):
    async with relayed(postgres_database_url) as (relay, through_relay):
        async def take_the_database_away() -> None:
            relay.take_away()
            await trio.lowlevel.checkpoint()
        report = await simulate_call_while(take_the_database_away, settings_for(through_relay, tmp_path), CALL_SID,
                                           after_s=2.0)
    assert report.talk_over_ms is not None
    spilled = list((tmp_path / "spill").glob("calls.*.jsonl"))
    assert len(spilled) == 1 and "CallEnded" in spilled[0].read_text()
    assert "records kept in the spill file for the next start" in caplog.text

    async with trio.open_nursery() as nursery:
        await nursery.start(serve, settings_for(postgres_database_url, tmp_path))
        with trio.fail_after(20):  # a bound on hangs; the replay takes well under a second
            while list((tmp_path / "spill").iterdir()):
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert_the_whole_call_is_stored(postgres_database_url, CALL_SID)
