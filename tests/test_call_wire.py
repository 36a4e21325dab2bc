"""The call path on the wire: a Realtime server we script, and Twilio frames good and bad."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from xml.etree import ElementTree

import peewee
import pytest
import trio
from trio_websocket import (
    CloseReason, ConnectionClosed, ConnectionRejected, ConnectionTimeout, HandshakeError, connect_websocket_url,
    open_websocket_url, serve_websocket,
)

from app.call import (
    CARRIER_SILENCE_TIMEOUT_S, CLOSING_LINE_TIMEOUT_S, INBOUND_QUEUE_FRAMES, MODEL_OUTBOX_EVENTS, MODEL_PING_INTERVAL_S,
    MODEL_PONG_TIMEOUT_S, MODEL_RECONNECTS, CallSession, ModelLinkLost,
    retry_pause_s, worth_retrying,
)
from app.carriers import twilio
from app.playback import CARRIER_OUTBOX_LIMIT_MS
from app.turn_events import PlayAudio
from app.carriers.simulated_twilio import SimulatedPhone, run_phone_call
from app import server as server_module
from app.server import serve
from app.settings import Settings
from dsp.g711 import ulaw_encode
from storage.db import open_database
from storage.migrate import apply_migrations
from storage.models import Call, TranscriptTurn
from tests.realtime_schemas import SDK_CLIENT_EVENTS
from tests.storage_fixtures import postgres_database_url  # noqa: F401 (fixture)
from tests.test_http_routes import http, post
from tests.test_turns import answering_call



@dataclass
class ScriptedRealtimeServer:
    """A Realtime endpoint that records what the call sends and says only what a test scripts."""

    say_after_session_update: list[dict] = field(default_factory=list)
    fail_first_connections: int = 0
    reject_first_connections: int = 0
    reject_status: int = 503
    reject_after_first: bool = False
    commit_caller_turn_after_s: float | None = None
    stall_after_session_update: bool = False  # reads nothing more: once the caller's audio fills its one-message
    # queue, trio-websocket's reader blocks, and pings go unanswered
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    received: list[dict] = field(default_factory=list)
    closed_at: list[float] = field(default_factory=list)

    async def handle(self, request) -> None:
        headers = {name.decode().lower(): value.decode() for name, value in request.headers}
        self.requests.append((request.path, headers))
        fail_this_one = len(self.requests) <= self.fail_first_connections
        if len(self.requests) <= self.reject_first_connections or (self.reject_after_first and len(self.requests) > 1):
            await request.reject(self.reject_status)
            return
        socket = await request.accept()
        async with trio.open_nursery() as nursery:
            try:
                while True:
                    event = json.loads(await socket.get_message())
                    SDK_CLIENT_EVENTS.validate_python(event)
                    self.received.append(event)
                    if event["type"] == "session.update":
                        for reply in self.say_after_session_update:
                            await socket.send_message(reply if isinstance(reply, str) else json.dumps(reply))
                        if self.commit_caller_turn_after_s is not None:
                            nursery.start_soon(self._commit_caller_turn_later, socket)
                        if fail_this_one:
                            await socket.aclose(1011, "scripted failure")
                        if self.stall_after_session_update:
                            await trio.sleep_forever()
            except ConnectionClosed:
                self.closed_at.append(trio.current_time())
            nursery.cancel_scope.cancel()

    async def _commit_caller_turn_later(self, socket) -> None:
        """The server VAD's word that the caller finished a turn; then this model says nothing at all."""
        await trio.sleep(self.commit_caller_turn_after_s)
        with contextlib.suppress(ConnectionClosed):
            await socket.send_message(json.dumps({
                "type": "input_audio_buffer.committed", "event_id": "event_commit", "item_id": "item_caller_1",
                "previous_item_id": None}))


@asynccontextmanager
async def serving(model: ScriptedRealtimeServer, tmp_path, **overrides):
    """callgate on a free port, with `model` as its OpenAI endpoint; yields the port."""
    async with trio.open_nursery() as nursery:
        model_server = await nursery.start(serve_websocket, model.handle, "127.0.0.1", 0, None)
        settings = Settings(**{
            "database_url": f"sqlite:///{tmp_path / 'calls.db'}", "spill_dir": str(tmp_path / "spill"), "port": 0, "openai_api_key": "sk-test",
            "realtime_url": f"ws://127.0.0.1:{model_server.port}/v1/realtime", **overrides})
        yield await nursery.start(serve, settings)
        await trio.sleep(1.5)  # the server's side of each call winds down after the phone's stop
        nursery.cancel_scope.cancel()


async def call_with(model: ScriptedRealtimeServer, tmp_path, script, *, calls: int = 1, **overrides):
    """Place `calls` phone calls running `script` against callgate serving with `model`."""
    phones = [SimulatedPhone(seed=number) for number in range(calls)]
    async with serving(model, tmp_path, **overrides) as port, trio.open_nursery() as call_nursery:
        for number, phone in enumerate(phones):
            call_nursery.start_soon(run_phone_call, "127.0.0.1", port, f"CA{number:032d}", script, phone)
    return phones


def signed_parameters(secret: str, call_sid: str, expires_in_s: int = 60, **parameters: str) -> dict[str, str]:
    """Stream parameters as our webhook signs them, with their token."""
    token = twilio.stream_token(secret, call_sid, parameters, int(time.time()) + expires_in_s)
    return {**parameters, "token": token}


def start_frame(call_sid: str, parameters: dict[str, str], encoding: str = "audio/x-mulaw") -> str:
    return json.dumps({"event": "start", "streamSid": "MZ1", "start": {
        "streamSid": "MZ1", "callSid": call_sid, "customParameters": parameters,
        "mediaFormat": {"encoding": encoding, "sampleRate": 8000, "channels": 1}}})


def talk_for(seconds: float):
    async def script(phone, elapsed_s):
        await trio.sleep(seconds)
    return script


async def test_the_model_socket_is_opened_as_openai_expects_and_every_event_validates(tmp_path, autojump_clock):
    model = ScriptedRealtimeServer()
    await call_with(model, tmp_path, talk_for(1.0), realtime_model="gpt-realtime-2.1-mini")
    path, headers = model.requests[0]
    assert path == "/v1/realtime?model=gpt-realtime-2.1-mini"
    assert headers["authorization"] == "Bearer sk-test"
    assert "openai-beta" not in headers
    types = [event["type"] for event in model.received]
    assert types[:2] == ["session.update", "response.create"]
    session = model.received[0]["session"]
    assert session["audio"]["input"]["format"] == {"type": "audio/pcmu"}
    assert session["audio"]["input"]["turn_detection"]["interrupt_response"] is False
    assert session["audio"]["input"]["turn_detection"]["threshold"] == 0.82
    # The greeting lock: while protected the model hears 20 ms of mu-law silence per inbound frame.
    appended = [event["audio"] for event in model.received if event["type"] == "input_audio_buffer.append"]
    assert len(appended) >= 45 and set(appended) == {"/" * 212 + "/w=="}


async def test_the_model_socket_closes_within_one_second_of_hang_up(tmp_path, autojump_clock):
    model = ScriptedRealtimeServer()
    hung_up_at = []

    async def script(phone, elapsed_s):
        await trio.sleep(1.0)
        hung_up_at.append(trio.current_time())

    await call_with(model, tmp_path, script)
    assert len(model.closed_at) == 1
    assert 0 <= model.closed_at[0] - hung_up_at[0] < 1.0


async def test_unknown_and_error_events_from_the_model_are_logged_never_fatal(tmp_path, autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="callgate")
    model = ScriptedRealtimeServer(say_after_session_update=[
        {"type": "response.brand_new_event", "event_id": "event_1"},
        {"type": "error", "event_id": "event_2", "error": {"type": "invalid_request_error",
                                                           "code": "input_audio_buffer_commit_empty",
                                                           "message": "buffer empty", "event_id": None}},
        {"type": "response.created", "event_id": "event_3"},  # missing its response: invalid
        "{not json",
        {"type": "input_audio_buffer.speech_started", "event_id": "event_4", "audio_start_ms": 740, "item_id": "i"},
    ])
    await call_with(model, tmp_path, talk_for(1.0))
    call = "call=CA" + "0" * 32
    assert call_log(caplog) == [
        ("INFO", f"{call} [CALL] media stream started stream=MZ{'0' * 32}"),
        ("WARNING", f"{call} [MODEL] unknown event type skipped type=response.brand_new_event"),
        ("ERROR", f"{call} [MODEL_ERROR] buffer empty code=input_audio_buffer_commit_empty event_id=''"),
        ("WARNING", f"{call} [MODEL] event outside the SDK's schema, read leniently type=response.created "
                    "why=\"1 errors, first: ('response.created', 'response') Field required\""),
        ("ERROR", f"{call} [MODEL] bad event from model skipped type=response.created "
                  "why=\"unusable response.created: "
                  "AttributeError 'LooseServerEvent' object has no attribute 'response'\""),
        ("ERROR", f"{call} [MODEL] bad event from model skipped why='malformed JSON from model: "
                  "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)'"),
        ("INFO", f"{call} [MODEL] model heard the caller start speaking audio_start_ms=740"),
        ("INFO", f"{call} [CALL] call ending reason=carrier_stop"),
        ("INFO", f"{call} [CALL] call ended reason=carrier_stop"),
    ]


def call_log(caplog) -> list[tuple[str, str]]:
    """The call's own log lines, with their levels."""
    return [(record.levelname, record.getMessage()) for record in caplog.records if record.name == "callgate.call"]


async def test_a_lost_model_link_is_reopened_and_only_its_own_call_notices(tmp_path, autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="callgate")
    failing_once = ScriptedRealtimeServer(fail_first_connections=1)
    phones = await call_with(failing_once, tmp_path, talk_for(1.0), calls=2)
    lost = [line for line in call_log(caplog) if "model link lost" in line[1]]
    assert [(level, line.split(" ", 1)[1]) for level, line in lost] == [
        ("WARNING", "[MODEL] model link lost, reopening it why='model socket closed code=1011 scripted failure' "
                    "reconnect=1")]
    assert len(failing_once.requests) == 3 and caplog.text.count("call ended reason=carrier_stop") == 2
    assert not any(what == "server hung up" for phone in phones for _, what in phone.timeline.events)
    # The greeting had not come: the new session is set up and asked for it again.
    kinds = [event["type"] for event in failing_once.received if event["type"] != "input_audio_buffer.append"]
    assert kinds.count("session.update") == 3
    assert "callgate_first_response_2" in [event.get("event_id") for event in failing_once.received]
    assert "Traceback" not in caplog.text


async def test_a_model_link_that_keeps_dropping_ends_the_call_and_the_caller_hears_the_apology(
        tmp_path, autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="callgate")
    always_failing = ScriptedRealtimeServer(fail_first_connections=100)
    async with serving(always_failing, tmp_path) as port:
        await run_phone_call("127.0.0.1", port, "CA1", talk_for(5.0), SimulatedPhone())
        what_follows = await ask_what_follows_the_stream(port, "CA1")
    assert len(always_failing.requests) == 1 + MODEL_RECONNECTS
    assert ("ERROR", "call=CA1 [CALL] model link lost, ending call why='model socket closed code=1011 scripted "
                     "failure'") in call_log(caplog)
    assert "call=CA1 [CALL] call ended reason=model_link_lost" in caplog.text
    said = ElementTree.fromstring(what_follows)
    assert [(element.tag, element.text) for element in said] == [("Say", Settings().apology_text), ("Hangup", None)]


async def test_a_model_that_cannot_be_reopened_ends_the_call_at_once(tmp_path, autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="callgate")
    model = ScriptedRealtimeServer(fail_first_connections=1, reject_after_first=True)
    async with serving(model, tmp_path) as port:
        await run_phone_call("127.0.0.1", port, "CA1", talk_for(10.0), SimulatedPhone())
    assert any("reopening it failed" in line and "ConnectionRejected" in line for _, line in call_log(caplog))
    assert "call=CA1 [CALL] call ended reason=model_link_lost" in caplog.text


async def test_a_model_that_stalls_without_closing_is_found_by_its_missing_pong(tmp_path, autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="callgate")
    phones = await call_with(ScriptedRealtimeServer(stall_after_session_update=True), tmp_path, talk_for(60.0))
    assert ("ERROR", "call=CA" + "0" * 32 + " [CALL] model link lost, ending call "
            f"why='no pong from the model within {MODEL_PONG_TIMEOUT_S} s'") in call_log(caplog)
    hung_up_at_s = [at for at, what in phones[0].timeline.events if what == "server hung up"]
    assert len(hung_up_at_s) == 1
    # Each stalled link is found by its missing pong, and reopened while reconnects are left.
    links = 1 + MODEL_RECONNECTS
    found_within_s = (MODEL_PING_INTERVAL_S + MODEL_PONG_TIMEOUT_S, 2 * MODEL_PING_INTERVAL_S + MODEL_PONG_TIMEOUT_S)
    assert links * found_within_s[0] <= hung_up_at_s[0] < links * found_within_s[1]
    assert caplog.text.count("model link lost, reopening it why='no pong from the model") == MODEL_RECONNECTS


async def test_bad_carrier_frames_are_logged_and_the_call_goes_on(tmp_path, autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="callgate")
    model = ScriptedRealtimeServer()
    async with serving(model, tmp_path, stream_token_secret="shared-secret") as port:
        call_sid = "CA" + "9" * 32
        parameters = signed_parameters("shared-secret", call_sid)
        async with open_websocket_url(f"ws://127.0.0.1:{port}/media/twilio") as socket:
            await socket.send_message(start_frame(call_sid, parameters))
            await socket.send_message("{not json")
            await socket.send_message(b"\x00\x01")
            await socket.send_message(json.dumps({"event": "media", "streamSid": "MZ1",
                                                  "media": {"payload": "!!!not base64"}}))
            await socket.send_message(json.dumps({"event": "media", "streamSid": "MZ1",
                                                  "media": {"payload": "AAAA", "chunk": "1"}}))
            await socket.send_message(json.dumps({"event": "dtmf", "streamSid": "MZ1", "dtmf": {"digit": "7"}}))
            await socket.send_message(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
            await trio.sleep(0.5)
    call = f"call={call_sid}"
    # The inbound task checks frame sizes on its own schedule, so only the set of lines is fixed.
    assert sorted(call_log(caplog)) == sorted([
        ("INFO", f"{call} [CALL] media stream started stream=MZ1"),
        ("ERROR", f"{call} [CARRIER] bad frame from carrier ignored why='malformed JSON from carrier: "
                  "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)'"),
        ("ERROR", f"{call} [CARRIER] binary frame from carrier ignored (Twilio 31950)"),
        ("ERROR", f"{call} [CARRIER] bad frame from carrier ignored why=\"bad 'media' frame: Error Only base64 data "
                  "is allowed\""),
        ("ERROR", f"{call} [INBOUND] inbound frame of unexpected size ignored bytes=3 chunk=1"),
        ("INFO", f"{call} [DTMF] caller pressed a key digit=7"),
        ("WARNING", f"{call} [CARRIER] unexpected event mid-call ignored event=Connected"),
        ("INFO", f"{call} [CALL] call ending reason=carrier_closed"),
        ("INFO", f"{call} [CALL] call ended reason=carrier_closed"),
    ])
    assert any(event["type"] == "conversation.item.create" for event in model.received)


@pytest.mark.parametrize("parameters, encoding, why", [
    (signed_parameters("shared", "CA2"), "audio/x-mulaw", "bad or missing token"),
    (signed_parameters("other secret", "CA1"), "audio/x-mulaw", "bad or missing token"),
    ({"from": "+1555"}, "audio/x-mulaw", "bad or missing token"),
    ({**signed_parameters("shared", "CA1", business_id="3"), "business_id": "4"}, "audio/x-mulaw",
     "bad or missing token"),
    ({**signed_parameters("shared", "CA1"), "barge_in": "false"}, "audio/x-mulaw", "bad or missing token"),
    ({"token": "1.0", "from": ""}, "audio/x-mulaw", "bad or missing token"),
    (signed_parameters("shared", "CA1", expires_in_s=-2), "audio/x-mulaw", "token expired"),
    (signed_parameters("shared", "CA1", expires_in_s=3600), "audio/x-alaw",
     "audio must be audio/x-mulaw at 8000 Hz, got audio/x-alaw at 8000 Hz"),
])
async def test_a_stream_that_cannot_be_bridged_is_refused(tmp_path, autojump_clock, caplog, parameters, encoding, why):
    model = ScriptedRealtimeServer()
    async with serving(model, tmp_path, stream_token_secret="shared") as port:
        async with open_websocket_url(f"ws://127.0.0.1:{port}/media/twilio") as socket:
            await socket.send_message(start_frame("CA1", parameters, encoding))
            with pytest.raises(ConnectionClosed):
                await socket.get_message()
    assert model.requests == []
    assert f"call=CA1 [TWILIO] media stream refused why={why!r}" in caplog.text


async def until_logged(caplog, line: str) -> None:
    while line not in caplog.text:
        await trio.sleep(0.02)


async def refused(port: int, parameters: dict[str, str]) -> None:
    async with open_websocket_url(f"ws://127.0.0.1:{port}/media/twilio") as replay:
        await replay.send_message(start_frame("CA1", parameters))
        with pytest.raises(ConnectionClosed):
            await replay.get_message()


REUSED = "call=CA1 [TWILIO] media stream refused why=\"this call's stream token was already used\""


async def test_a_stream_token_opens_one_stream_even_once_its_call_has_ended(tmp_path, autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="callgate")
    model = ScriptedRealtimeServer()
    parameters = signed_parameters("shared", "CA1")
    async with serving(model, tmp_path, stream_token_secret="shared") as port:
        async with open_websocket_url(f"ws://127.0.0.1:{port}/media/twilio") as first:
            await first.send_message(start_frame("CA1", parameters))
            await until_logged(caplog, "call=CA1 [CALL] media stream started")
        await until_logged(caplog, "call=CA1 [CALL] call ended")
        await refused(port, parameters)
    assert caplog.text.count(REUSED) == 1 and len(model.requests) == 1


async def test_a_stream_token_opens_one_stream_in_all_the_processes_sharing_postgresql(
        postgres_database_url, tmp_path, autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="callgate")
    model = ScriptedRealtimeServer()
    parameters = signed_parameters("shared", "CA1", **{"from": "+15550001111"})
    shared = {"stream_token_secret": "shared", "database_url": postgres_database_url}
    async with serving(model, tmp_path, **shared) as first_port, serving(model, tmp_path, **shared) as second_port:
        async with open_websocket_url(f"ws://127.0.0.1:{first_port}/media/twilio") as first:
            await first.send_message(start_frame("CA1", parameters))
            await until_logged(caplog, "call=CA1 [CALL] media stream started")
            await refused(second_port, parameters)
    assert caplog.text.count(REUSED) == 1
    assert caplog.text.count("call=CA1 [CALL] media stream started") == 1 and len(model.requests) == 1


async def test_a_database_that_cannot_spend_the_token_never_costs_the_caller_the_call(
        postgres_database_url, tmp_path, autojump_clock, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="callgate")

    def failing_claim(database, call_sid):
        raise peewee.OperationalError("server closed the connection unexpectedly")
    monkeypatch.setattr(server_module, "claim_media_stream", failing_claim)
    model = ScriptedRealtimeServer()
    async with serving(model, tmp_path, stream_token_secret="shared", database_url=postgres_database_url) as port:
        async with open_websocket_url(f"ws://127.0.0.1:{port}/media/twilio") as socket:
            await socket.send_message(start_frame("CA1", signed_parameters("shared", "CA1")))
            await until_logged(caplog, "call=CA1 [CALL] media stream started")
    assert ("call=CA1 [TWILIO] stream token not spent, the database failed; call admitted "
            "why=OperationalError") in caplog.text


async def test_a_second_stream_for_a_live_call_is_refused_and_the_first_goes_on(tmp_path, autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="callgate")
    model = ScriptedRealtimeServer()
    async with serving(model, tmp_path, stream_token_secret="shared") as port:
        parameters = signed_parameters("shared", "CA1")
        async with open_websocket_url(f"ws://127.0.0.1:{port}/media/twilio") as first:
            await first.send_message(start_frame("CA1", parameters))
            await trio.sleep(0.5)
            async with open_websocket_url(f"ws://127.0.0.1:{port}/media/twilio") as second:
                await second.send_message(start_frame("CA1", parameters))
                with pytest.raises(ConnectionClosed):
                    await second.get_message()
            await first.send_message(json.dumps({"event": "dtmf", "streamSid": "MZ1", "dtmf": {"digit": "4"}}))
            await trio.sleep(0.5)
    assert "call=CA1 [TWILIO] media stream refused why='this call already has a media stream'" in caplog.text
    assert "call=CA1 [DTMF] caller pressed a key digit=4" in caplog.text
    assert "call=CA1 [CALL] call ended reason=carrier_closed" in caplog.text
    assert "Traceback" not in caplog.text


async def test_a_call_live_when_the_server_stops_is_recorded_as_cancelled(tmp_path, autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="callgate")
    model = ScriptedRealtimeServer()
    async with open_websocket_url_later() as connect:
        async with serving(model, tmp_path, stream_token_secret="shared") as port:
            socket = await connect(f"ws://127.0.0.1:{port}/media/twilio")
            await socket.send_message(start_frame("CA1", signed_parameters("shared", "CA1")))
            await trio.sleep(0.5)
    assert ("INFO", "call=CA1 [CALL] call ending reason=cancelled") in call_log(caplog)
    database = open_database(f"sqlite:///{tmp_path / 'calls.db'}")
    with database.bind_ctx([Call]):
        call = Call.get(Call.call_sid == "CA1")
        # A stream without the webhook's parameters still gets its record, with the numbers it lacks left empty.
        assert (call.end_reason, call.from_number, call.to_number, call.business_id) == ("cancelled", "", "", None)
    database.close()


@asynccontextmanager
async def open_websocket_url_later():
    """Client sockets opened inside, closed only after the block: they outlive a server stopped within it."""
    async with trio.open_nursery() as nursery:
        async def connect(url: str):
            return await connect_websocket_url(nursery, url)
        yield connect
        nursery.cancel_scope.cancel()


async def test_inbound_frames_beyond_the_queue_are_dropped_each_with_an_error(caplog):
    caplog.set_level(logging.INFO, logger="callgate")
    session = CallSession(Settings(), twilio.Start("MZ1", "CA1"), recorder=None)
    for chunk in range(INBOUND_QUEUE_FRAMES + 2):
        session._queue_inbound(twilio.Media(b"\xff" * 160, 20 * chunk, chunk))
    assert call_log(caplog) == [
        ("ERROR", f"call=CA1 [INBOUND] inbound audio queue full, frame dropped chunk={chunk}")
        for chunk in (INBOUND_QUEUE_FRAMES, INBOUND_QUEUE_FRAMES + 1)]


async def test_record_times_follow_the_calls_monotonic_clock_from_one_utc_anchor(autojump_clock):
    autojump_clock.jump(5000.0)  # trio's clock has an arbitrary origin
    session = CallSession(Settings(), twilio.Start("MZ1", "CA1"), recorder=None)
    now = trio.current_time()
    started = session._wall_time(now)
    assert started.tzinfo == timezone.utc
    assert abs((started - datetime.now(timezone.utc)).total_seconds()) < 60
    assert (session._wall_time(now + 7.25) - started).total_seconds() == pytest.approx(7.25)


async def test_a_model_that_stops_reading_is_a_lost_link_not_a_growing_queue():
    session = CallSession(Settings(), twilio.Start("MZ1", "CA1"), recorder=None)
    for _ in range(MODEL_OUTBOX_EVENTS):
        session._send_to_model({"type": "input_audio_buffer.append", "audio": "AA=="})
    with pytest.raises(ModelLinkLost) as lost:
        session._send_to_model({"type": "input_audio_buffer.append", "audio": "AA=="})
    assert str(lost.value) == f"{MODEL_OUTBOX_EVENTS} events queued for a model that is not reading"


class ClosedCarrier:
    """A carrier socket that is already gone when the call writes to it."""

    async def send_message(self, text: str) -> None:
        raise ConnectionClosed(CloseReason(1006, "gone"))


async def test_a_carrier_gone_when_the_call_writes_hangs_up_as_carrier_closed():
    session = CallSession(Settings(), twilio.Start("MZ1", "CA1"), recorder=None)
    async with trio.open_nursery() as nursery:
        session._nursery = nursery
        session._outbox.clear()
        nursery.start_soon(session._carrier_writer, ClosedCarrier())
        await trio.sleep_forever()
    assert session.end_reason == "carrier_closed"


class ClosedModel:
    """A model socket closed by the other side when the call writes to it."""

    async def send_message(self, text: str) -> None:
        raise ConnectionClosed(CloseReason(1011, "server error"))

    async def ping(self) -> None:
        raise ConnectionClosed(CloseReason(1011, "server error"))


async def test_a_model_socket_closed_on_write_is_a_lost_link_naming_its_close_code_and_reason():
    session = CallSession(Settings(), twilio.Start("MZ1", "CA1"), recorder=None)
    session._send_to_model({"type": "response.create"})
    with pytest.raises(ModelLinkLost) as lost:
        await session._model_writer(ClosedModel())
    assert str(lost.value) == "model socket closed code=1011 server error"


async def test_a_model_socket_closed_on_a_ping_is_a_lost_link_naming_its_close_code_and_reason(autojump_clock):
    session = CallSession(Settings(), twilio.Start("MZ1", "CA1"), recorder=None)
    with pytest.raises(ModelLinkLost) as lost:
        await session._model_keepalive(ClosedModel())
    assert str(lost.value) == "model socket closed code=1011 server error"


async def test_while_the_bot_talks_the_model_hears_the_callers_own_frames(speech_clip):
    session = CallSession(Settings(), twilio.Start("MZ1", "CA1"), recorder=Records())
    session.turns = answering_call()[0]  # an answer is playing: the bot is audible
    caller = ulaw_encode(speech_clip("caller_interrupt_en.wav")[:8000]).tobytes()
    payloads = [caller[start:start + 160] for start in range(0, len(caller) - 159, 160)]
    for chunk, payload in enumerate(payloads):
        session._on_inbound_frame(twilio.Media(payload, 20 * chunk, chunk))
    heard = []
    while True:
        try:
            event = session._model_out.receive_nowait()
        except trio.WouldBlock:
            break
        if event["type"] == "input_audio_buffer.append":
            heard.append(base64.b64decode(event["audio"]))
    assert len(heard) == len(payloads)
    as_spoken = [audio == payload for audio, payload in zip(heard, payloads)]
    # The caller's voice goes through as it is from its first voiced frames, before the 6-frame onset stops the bot.
    assert as_spoken.index(True) < 6 and sum(as_spoken) > len(payloads) // 2


class Records(list):
    """A recorder that keeps what the call submits."""

    def submit(self, record) -> None:
        self.append(record)


async def test_a_carrier_that_goes_silent_without_closing_is_hung_up_after_five_seconds(
        tmp_path, autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="callgate")
    model = ScriptedRealtimeServer()
    async with open_websocket_url_later() as connect:
        async with serving(model, tmp_path, stream_token_secret="shared") as port:
            socket = await connect(f"ws://127.0.0.1:{port}/media/twilio")
            await socket.send_message(start_frame("CA1", signed_parameters("shared", "CA1")))
            started_at = trio.current_time()
            with trio.fail_after(CARRIER_SILENCE_TIMEOUT_S + 1):
                with pytest.raises(ConnectionClosed):
                    await socket.get_message()  # nothing comes before the server's close: the model is silent
            silent_for_s = trio.current_time() - started_at
    assert CARRIER_SILENCE_TIMEOUT_S <= silent_for_s < CARRIER_SILENCE_TIMEOUT_S + 0.1
    assert ("WARNING", "call=CA1 [CARRIER] no message from the carrier, hanging up silent_s=5") in call_log(caplog)
    database = open_database(f"sqlite:///{tmp_path / 'calls.db'}")
    with database.bind_ctx([Call]):
        assert Call.get(Call.call_sid == "CA1").end_reason == "carrier_silent"
    database.close()


async def test_a_call_whose_model_never_says_its_closing_line_is_hung_up_after_the_line_s_longest(
        tmp_path, autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="callgate")
    model = ScriptedRealtimeServer()  # answers nothing, the closing line included
    phones = await call_with(model, tmp_path, talk_for(60.0), max_call_s=5.0)
    hung_up_at = next(at for at, what in phones[0].timeline.events if what == "server hung up")
    assert 5.0 + CLOSING_LINE_TIMEOUT_S <= hung_up_at < 5.0 + CLOSING_LINE_TIMEOUT_S + 0.1
    requests = [event for event in model.received if event["type"] == "response.create"]
    assert requests[-1]["event_id"] == "callgate_closing_line"
    assert ("WARNING", f"call=CA{0:032d} [CALL] closing line not heard in time, hanging up reason=max_duration") in (
        call_log(caplog))
    assert ("INFO", f"call=CA{0:032d} [CALL] call reached its maximum duration max_call_s=5.0") in call_log(caplog)
    assert ("INFO", f"call=CA{0:032d} [CALL] call ended reason=max_duration") in call_log(caplog)


async def test_closing_a_call_still_connecting_to_the_model_leaves_it_to_hang_up_with_the_server():
    session = CallSession(Settings(), twilio.Start("MZ1", "CA1"), recorder=None)
    session.close("shutdown")
    assert session.end_reason == ""


class CarrierThatStopsReading:
    """Sends a silent frame every 20 ms, as a live carrier does, but takes only the first message it is sent."""

    def __init__(self) -> None:
        self.taken: list[str] = []

    async def get_message(self) -> str:
        await trio.sleep(0.02)
        return json.dumps({"event": "media", "streamSid": "MZ1",
                           "media": {"payload": base64.b64encode(b"\xff" * 160).decode(), "chunk": "1"}})

    async def send_message(self, text: str) -> None:
        if self.taken:
            await trio.sleep_forever()
        self.taken.append(text)


class ModelThatListens:
    async def get_message(self) -> str:
        await trio.sleep_forever()

    async def send_message(self, text: str) -> None:
        pass


async def test_a_carrier_that_stops_reading_ends_the_call_instead_of_queueing_its_audio_forever(
        autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="callgate")
    records = Records()
    session = CallSession(Settings(), twilio.Start("MZ1", "CA1"), records)
    carrier = CarrierThatStopsReading()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run, carrier, ModelThatListens())
        await trio.sleep(0.1)
        for number in range(2 * CARRIER_OUTBOX_LIMIT_MS // 100):
            session._carry_out(PlayAudio("resp_1", b"\xff" * 800, f"resp_1:{number}"))
    assert session.end_reason == "carrier_not_reading" and records[-1].end_reason == "carrier_not_reading"
    lead_s = Settings().playback_lead_ms / 1000
    assert trio.current_time() == pytest.approx(0.1 + CARRIER_OUTBOX_LIMIT_MS / 1000 - lead_s + 0.1, abs=0.05)
    assert ("ERROR", f"call=CA1 [CALL] carrier stopped reading, ending call "
                     f"why='{CARRIER_OUTBOX_LIMIT_MS} ms of audio unsent: the carrier stopped reading'") in (
        call_log(caplog))
    assert len(carrier.taken) == 1


async def ask_what_follows_the_stream(port: int, call_sid: str) -> str:
    status, body = await http(port, post("/twilio/stream-ended", f"CallSid={call_sid}&CallStatus=in-progress"))
    assert status == 200
    return body.decode()


async def test_a_model_that_never_answers_the_caller_is_asked_again_then_the_caller_hears_the_apology(
        tmp_path, autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="callgate")
    # No greeting comes either: its retries run out and barge-in opens at some 31 s, before the caller's turn.
    model = ScriptedRealtimeServer(commit_caller_turn_after_s=40.0)
    phone = SimulatedPhone()
    async with serving(model, tmp_path) as port:
        await run_phone_call("127.0.0.1", port, "CA1", talk_for(120.0), phone)
        what_follows = await ask_what_follows_the_stream(port, "CA1")
    creates = [event for event in model.received if event["type"] == "response.create"]
    assert len(creates) == 1 + Settings().first_response_max_retries + 1  # the greeting's, and the one asked again
    assert "call=CA1 [MODEL] no sign of a reply from the model; asking again" in caplog.text
    assert ("ERROR", "call=CA1 [MODEL] no reply from the model after asking again; ending the call timeout_s=6.0") \
        in call_log(caplog)
    assert "call=CA1 [CALL] call ended reason=model_unresponsive" in caplog.text
    hung_up_at = next(at for at, what in phone.timeline.events if what == "server hung up")
    assert 40.0 + 2 * Settings().model_reply_timeout_s <= hung_up_at <= 40.0 + 2 * Settings().model_reply_timeout_s + 1
    said = ElementTree.fromstring(what_follows)
    assert [(element.tag, element.text) for element in said] == [("Say", Settings().apology_text), ("Hangup", None)]


@pytest.mark.parametrize("rejections, status, attempts, outcome", [
    (1, 503, 2, "carrier_closed"),
    (2, 429, 3, "carrier_closed"),
    (3, 500, 3, "model_unreachable"),
    (1, 401, 1, "model_unreachable"),
])
async def test_a_model_that_refuses_the_socket_is_tried_again_then_the_caller_hears_an_apology(
        tmp_path, autojump_clock, caplog, rejections, status, attempts, outcome):
    caplog.set_level(logging.INFO, logger="callgate")
    model = ScriptedRealtimeServer(reject_first_connections=rejections, reject_status=status)
    async with serving(model, tmp_path, stream_token_secret="shared") as port:
        async with open_websocket_url(f"ws://127.0.0.1:{port}/media/twilio") as socket:
            await socket.send_message(start_frame("CA1", signed_parameters("shared", "CA1", **{"from": "+1555"})))
            while not (model.received or "call=CA1 [CALL] could not reach the model" in caplog.text):
                await trio.sleep(0.02)
        await until_logged(caplog, "call=CA1 [CALL] call ended" if outcome == "carrier_closed" else "call dropped")
        what_follows = await ask_what_follows_the_stream(port, "CA1")
    assert len(model.requests) == attempts
    retries = [line for line in call_log(caplog) if "trying again" in line[1]]
    assert [(level, line.split(" why=")[0]) for level, line in retries] == [
        ("WARNING", f"call=CA1 [CALL] model connection failed, trying again attempt={attempt}")
        for attempt in range(1, attempts)]
    said = ElementTree.fromstring(what_follows)
    if outcome == "model_unreachable":
        assert ("ERROR", f"call=CA1 [CALL] could not reach the model, call dropped "
                         f"why=ConnectionRejected<status_code={status}>") in call_log(caplog)
        assert [(element.tag, element.text) for element in said] == [("Say", Settings().apology_text), ("Hangup", None)]
    else:
        assert [element.tag for element in said] == ["Hangup"]
    database = open_database(f"sqlite:///{tmp_path / 'calls.db'}")
    with database.bind_ctx([Call]):
        call = Call.get(Call.call_sid == "CA1")
    database.close()
    assert (call.end_reason, call.from_number) == (outcome, "+1555")


async def test_what_follows_a_stream_run_by_another_process_comes_from_its_record(tmp_path, autojump_clock):
    database = open_database(f"sqlite:///{tmp_path / 'calls.db'}")
    apply_migrations(database)
    with database.bind_ctx([Call]):
        Call.create(call_sid="CA7", stream_sid="MZ7", from_number="", to_number="",
                    started_at=datetime(2026, 1, 1), end_reason="model_link_lost")
    database.close()
    async with serving(ScriptedRealtimeServer(), tmp_path, fallback_dial="+15550009999") as port:
        assert "<Dial>+15550009999</Dial>" in await ask_what_follows_the_stream(port, "CA7")
        assert "<Say>" not in await ask_what_follows_the_stream(port, "CA8")  # a stream never started: hang up


def test_only_a_busy_or_failing_model_or_a_socket_that_did_not_open_is_tried_again():
    def rejected(status: int) -> ConnectionRejected:
        return ConnectionRejected(status, [], b"")
    assert worth_retrying(HandshakeError()) and worth_retrying(OSError("connection refused"))
    assert worth_retrying(rejected(429)) and worth_retrying(rejected(500)) and worth_retrying(rejected(503))
    assert not worth_retrying(rejected(401)) and not worth_retrying(rejected(404))
    assert not worth_retrying(ConnectionTimeout())


async def test_the_callers_transcribed_words_are_stored_as_their_turn(tmp_path, autojump_clock):
    model = ScriptedRealtimeServer(say_after_session_update=[
        {"type": "input_audio_buffer.committed", "event_id": "event_1", "item_id": "item_c1",
         "previous_item_id": None},
        {"type": "conversation.item.input_audio_transcription.completed", "event_id": "event_2",
         "item_id": "item_c1", "content_index": 0, "transcript": "When do you open on Sunday?",
         "usage": {"type": "duration", "seconds": 1.4}},
    ])
    await call_with(model, tmp_path, talk_for(1.0))
    session = next(event["session"] for event in model.received if event["type"] == "session.update")
    assert session["audio"]["input"]["transcription"] == {"model": "gpt-4o-mini-transcribe"}
    database = open_database(f"sqlite:///{tmp_path / 'calls.db'}")
    with database.bind_ctx([TranscriptTurn]):
        assert [(turn.role, turn.text, turn.truncated) for turn in TranscriptTurn.select()] == [
            ("user", "When do you open on Sunday?", False)]
    database.close()


def test_connect_retries_pause_twice_as_long_each_time_spread_by_half_either_way():
    assert [retry_pause_s(attempt, lambda: 0.5) for attempt in (1, 2)] == [0.25, 0.5]
    assert (retry_pause_s(1, lambda: 0.0), retry_pause_s(2, lambda: 1.0)) == (0.125, 0.75)
    assert len({retry_pause_s(1) for _ in range(20)}) > 1
