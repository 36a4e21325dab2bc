"""One call: a nursery of thin trio tasks that feed the turn-taking machine and carry out its actions.

A frame's path reads one way: carrier codec -> dsp -> turns -> realtime codec.
"""

from __future__ import annotations

import logging
import math
import random
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import AsyncIterator, Callable, Protocol
from urllib.parse import quote, urlsplit

import trio
from trio_websocket import (
    ConnectionClosed, ConnectionRejected, ConnectionTimeout, HandshakeError, WebSocketConnection, open_websocket_url,
)

from app.carriers import twilio
from app.logs import log_event
from app.model_events import to_turn_event
from app.playback import CarrierNotReading, CarrierOutbox, Playback, PlayoutReference
from app.realtime import protocol
from app.settings import Settings
from app.turn_events import (
    CallEnding, CallStarted, ClearCarrier, CloseCall, DtmfPressed, HangUp, Log, MarkPlayed, ModelReconnected, PlayAudio,
    RecordEvent, RecordTranscript, SendToModel, StopPlayback, Tick, TurnAction, TurnEvent, VoiceOnset,
)
from app.turns import InboundDisposition, Turns
from dsp.g711 import ULAW_SILENCE
from dsp.inbound import InboundFrameAnalyzer
from storage.records import CallEnded, CallEventRecord, CallStarted as CallStartedRecord, TranscriptTurnRecord

logger = logging.getLogger("callgate.call")

MODEL_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
MODEL_CONNECT_TIMEOUT_S = 10
MODEL_CONNECT_ATTEMPTS = 3
MODEL_CONNECT_RETRY_S = 0.25  # then 0.5 s: the caller hears silence while we try again
MODEL_DISCONNECT_TIMEOUT_S = 1  # the model socket must be closed within 1 s of hang-up
MODEL_PING_INTERVAL_S = 5  # a model link gone half-open sends nothing, not even a close: ask it
MODEL_PONG_TIMEOUT_S = 5
MODEL_RECONNECTS = 2  # per call: a link that keeps dropping is a model that is down
MODEL_RECONNECT_TIMEOUT_S = 1  # per try, while the caller hears a pause: three tries and their pauses stay under 4 s
MODEL_OUTBOX_EVENTS = 1000  # 20 s of inbound audio: beyond that the model link is dead, not slow
INBOUND_QUEUE_FRAMES = 50
CARRIER_SILENCE_TIMEOUT_S = 5  # Twilio sends a frame every 20 ms, silence included: 5 s of nothing is a dead line
CLOSING_LINE_TIMEOUT_S = 20  # the closing line's longest: a model that never says it does not hold the call
SILENT_FRAME = bytes([ULAW_SILENCE]) * twilio.MEDIA_FRAME_BYTES


class Recorder(Protocol):
    def submit(self, record: object) -> None: ...

    async def flush(self) -> None: ...


@dataclass(frozen=True)
class ModelEndpoint:
    """Where the Realtime socket goes: OpenAI, or any Realtime-compatible server such as the local model."""

    url: str
    model: str
    api_key: str = field(repr=False)

    @property
    def connect_url(self) -> str:
        separator = "&" if urlsplit(self.url).query else "?"
        return f"{self.url}{separator}model={quote(self.model)}"


def worth_retrying(error: Exception) -> bool:
    """A busy or failing endpoint (429, 5xx) or a connection that did not open may answer the next try;
    a refusal such as 401 or 404 will not, and a timeout has already cost the caller its wait."""
    if isinstance(error, ConnectionRejected):
        return error.status_code == 429 or error.status_code >= 500
    return not isinstance(error, ConnectionTimeout)


@asynccontextmanager
async def open_model_socket(
    endpoint: ModelEndpoint, on_retry: Callable[[int, Exception], None], *,
    connect_timeout_s: float = MODEL_CONNECT_TIMEOUT_S,
) -> AsyncIterator[WebSocketConnection]:
    """The model socket, tried up to MODEL_CONNECT_ATTEMPTS times, with a doubling pause between tries."""
    headers = [(b"Authorization", f"Bearer {endpoint.api_key}".encode())]
    for attempt in range(1, MODEL_CONNECT_ATTEMPTS + 1):
        async with AsyncExitStack() as stack:
            try:
                socket = await stack.enter_async_context(open_websocket_url(
                    endpoint.connect_url,
                    extra_headers=headers,
                    max_message_size=MODEL_MAX_MESSAGE_BYTES,
                    connect_timeout=connect_timeout_s,
                    disconnect_timeout=MODEL_DISCONNECT_TIMEOUT_S,
                ))
            except (HandshakeError, OSError) as error:
                if attempt == MODEL_CONNECT_ATTEMPTS or not worth_retrying(error):
                    raise
                on_retry(attempt, error)
                await trio.sleep(retry_pause_s(attempt))
                continue
            yield socket
            return


def retry_pause_s(attempt: int, draw: Callable[[], float] = random.random) -> float:
    """The pause after the `attempt`th failed connect: doubling, and spread by +-50% so that calls which
    lost the model together do not come back to it in step."""
    return MODEL_CONNECT_RETRY_S * 2 ** (attempt - 1) * (0.5 + draw())


ModelOpener = Callable[[], AbstractAsyncContextManager[WebSocketConnection]]


class ModelLinkLost(Exception):
    """The model socket closed or stalled mid-call."""

    @classmethod
    def closed(cls, closed: ConnectionClosed) -> ModelLinkLost:
        """The same words whichever direction of the socket saw the close first."""
        return cls(f"model socket closed code={int(closed.reason.code)} {closed.reason.reason}")


@contextmanager
def model_link_lost_on_close():
    """Whichever of the call's model tasks sees the socket closed, the call ends with the same lost link."""
    try:
        yield
    except ConnectionClosed as closed:
        raise ModelLinkLost.closed(closed) from None


class CallSession:
    """Runs one call between a started carrier stream and a model socket, until either side ends it."""

    def __init__(self, settings: Settings, start: twilio.Start, recorder: Recorder) -> None:
        self.settings = settings
        self.call_sid = start.call_sid
        self.stream_sid = start.stream_sid
        self._start = start
        self._recorder = recorder
        barge_in_enabled = start.custom_parameters.get("barge_in", "true").lower() != "false"
        self.turns = Turns(settings, barge_in_enabled=barge_in_enabled)
        self._analyzer = InboundFrameAnalyzer(
            gate_mode=settings.echo_gate_mode,
            min_rms=settings.echo_gate_min_rms,
            vad_aggressiveness=settings.vad_aggressiveness,
            voice_frames=settings.barge_in_voice_frames,
            debounce_ms=settings.barge_in_debounce_ms,
        )
        self._reference = PlayoutReference()
        self._outbox = CarrierOutbox(self.stream_sid, self._reference)
        self._model_out_send, self._model_out = trio.open_memory_channel[dict](MODEL_OUTBOX_EVENTS)
        self._inbound_send, self._inbound = trio.open_memory_channel[twilio.Media](INBOUND_QUEUE_FRAMES)
        playback_send, playback_receive = trio.open_memory_channel[PlayAudio](math.inf)
        self._playback_send = playback_send
        self._playback = Playback(playback_receive, self._outbox, settings.playback_lead_ms)
        self.end_reason = ""
        self._model_link_up = True
        self._nursery: trio.Nursery | None = None
        # Record times come from trio's monotonic clock, anchored once: a wall-clock step mid-call moves no record.
        self._clock_anchor = (trio.current_time(), datetime.now(timezone.utc))

    def log(self, tag: str, message: str, *, level: int = logging.INFO, **fields: object) -> None:
        log_event(logger, self.call_sid, tag, message, level=level, **fields)

    async def run(self, carrier: WebSocketConnection, model: WebSocketConnection,
                  reopen_model: ModelOpener | None = None) -> str:
        """Run the call's tasks in one nursery; returns why the call ended. Cancelling it hangs up cleanly.

        A model link lost mid-call is reopened through `reopen_model` (up to MODEL_RECONNECTS times),
        and the new session is told the call so far; without it, or when that fails, the call ends.
        """
        self._record_start()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._carrier_reader, carrier)
                nursery.start_soon(self._carrier_writer, carrier)
                nursery.start_soon(self._inbound_audio)
                nursery.start_soon(self._model_link, model, reopen_model)
                nursery.start_soon(self._playback.run)
                nursery.start_soon(self._close_at_max_duration)
                self.feed(CallStarted())
        except* ModelLinkLost as lost:
            self.end_reason = "model_link_lost"
            self.log("CALL", "model link lost, ending call", level=logging.ERROR, why=str(lost.exceptions[0]))
        except* CarrierNotReading as stuck:
            self.end_reason = "carrier_not_reading"
            self.log("CALL", "carrier stopped reading, ending call", level=logging.ERROR, why=str(stuck.exceptions[0]))
        finally:
            self.end_reason = self.end_reason or "cancelled"
            self.feed(CallEnding(self.end_reason))
            self._recorder.submit(CallEnded(
                call_sid=self.call_sid, ended_at=self._wall_time(trio.current_time()), end_reason=self.end_reason))
        return self.end_reason

    def model_unreachable(self, why: str) -> None:
        """The model could not be reached at all: the call is recorded, with its reason, and ends."""
        self.end_reason = "model_unreachable"
        self.log("CALL", "could not reach the model, call dropped", level=logging.ERROR, why=why)
        self._record_start()
        self._recorder.submit(CallEnded(
            call_sid=self.call_sid, ended_at=self._wall_time(trio.current_time()), end_reason=self.end_reason))

    def _record_start(self) -> None:
        self._recorder.submit(CallStartedRecord(
            call_sid=self.call_sid, stream_sid=self.stream_sid,
            from_number=self._start.custom_parameters.get("from", ""),
            to_number=self._start.custom_parameters.get("to", ""),
            business_id=_optional_int(self._start.custom_parameters.get("business_id")),
            started_at=self._clock_anchor[1],  # when the stream started, however long the model took
        ))

    def hang_up(self, reason: str) -> None:
        self.end_reason = self.end_reason or reason
        self._nursery.cancel_scope.cancel()

    def close(self, reason: str) -> None:
        """End the call after the bot's closing line, or CLOSING_LINE_TIMEOUT_S from now, whichever is first.

        A call still connecting to the model has nothing to close yet: it hangs up with the server.
        """
        if self._nursery is None:
            return
        self.feed(CloseCall(reason))
        self._nursery.start_soon(self._hang_up_after, CLOSING_LINE_TIMEOUT_S, reason)

    async def _hang_up_after(self, delay_s: float, reason: str) -> None:
        await trio.sleep(delay_s)
        self.log("CALL", "closing line not heard in time, hanging up", level=logging.WARNING, reason=reason)
        self.hang_up(reason)

    async def _close_at_max_duration(self) -> None:
        await trio.sleep(self.settings.max_call_s)
        self.log("CALL", "call reached its maximum duration", max_call_s=self.settings.max_call_s)
        self.close("max_duration")

    def feed(self, event: TurnEvent) -> None:
        """Hand one event to the turn-taking machine and carry out its actions at once, in order."""
        for action in self.turns.handle(event, trio.current_time()):
            self._carry_out(action)

    def _carry_out(self, action: TurnAction) -> None:
        match action:
            case SendToModel(event):
                self._send_to_model(event)
            case PlayAudio():
                self._playback_send.send_nowait(action)
            case StopPlayback(response_id):
                self._playback.stop(response_id)
            case ClearCarrier():
                self._playback.carrier_cleared()
            case Log(tag, message, fields, level):
                self.log(tag, message, level=logging.getLevelName(level.upper()), **fields)
            case RecordEvent(kind, detail):
                self._recorder.submit(CallEventRecord(
                    call_sid=self.call_sid, kind=kind, at=self._wall_time(trio.current_time()), detail=detail))
            case HangUp(reason):
                self.hang_up(reason)
            case RecordTranscript(role, text, started_at_s, truncated, heard_ms):
                self._recorder.submit(TranscriptTurnRecord(
                    call_sid=self.call_sid, role=role, text=text, started_at=self._wall_time(started_at_s),
                    truncated=truncated,
                    heard_ms=heard_ms,
                ))

    def _wall_time(self, at_s: float) -> datetime:
        anchor_s, anchor_wall = self._clock_anchor
        return anchor_wall + timedelta(seconds=at_s - anchor_s)

    def _send_to_model(self, event: dict) -> None:
        if not self._model_link_up:
            return  # the new session is told the call so far instead
        try:
            self._model_out_send.send_nowait(event)
        except trio.WouldBlock:
            raise ModelLinkLost(f"{MODEL_OUTBOX_EVENTS} events queued for a model that is not reading") from None

    async def _carrier_reader(self, carrier: WebSocketConnection) -> None:
        try:
            while True:
                with trio.move_on_after(CARRIER_SILENCE_TIMEOUT_S) as waited:
                    text = await carrier.get_message()
                if waited.cancelled_caught:
                    self.log("CARRIER", "no message from the carrier, hanging up", level=logging.WARNING,
                             silent_s=CARRIER_SILENCE_TIMEOUT_S)
                    self.hang_up("carrier_silent")
                    return
                self._on_carrier_message(text)
        except ConnectionClosed:
            self.hang_up("carrier_closed")

    def _on_carrier_message(self, text: str | bytes) -> None:
        if isinstance(text, bytes):
            self.log("CARRIER", "binary frame from carrier ignored (Twilio 31950)", level=logging.ERROR)
            return
        try:
            event = twilio.parse(text)
        except twilio.CarrierProtocolError as error:
            self.log("CARRIER", "bad frame from carrier ignored", level=logging.ERROR, why=str(error))
            return
        match event:
            case twilio.Media():
                self._queue_inbound(event)
            case twilio.Mark(name):
                self.feed(MarkPlayed(name))
            case twilio.Dtmf(digit):
                self.feed(DtmfPressed(digit))
            case twilio.Stop():
                self.hang_up("carrier_stop")
            case _:
                self.log("CARRIER", "unexpected event mid-call ignored", level=logging.WARNING,
                         event=type(event).__name__)

    def _queue_inbound(self, media: twilio.Media) -> None:
        try:
            self._inbound_send.send_nowait(media)
        except trio.WouldBlock:
            self.log("INBOUND", "inbound audio queue full, frame dropped", level=logging.ERROR, chunk=media.chunk)

    async def _carrier_writer(self, carrier: WebSocketConnection) -> None:
        try:
            while True:
                await carrier.send_message(await self._outbox.next_message())
        except ConnectionClosed:
            self.hang_up("carrier_closed")

    async def _inbound_audio(self) -> None:
        async for media in self._inbound:
            self._on_inbound_frame(media)
            await trio.lowlevel.checkpoint()

    def _on_inbound_frame(self, media: twilio.Media) -> None:
        if len(media.payload) != twilio.MEDIA_FRAME_BYTES:
            self.log("INBOUND", "inbound frame of unexpected size ignored", level=logging.ERROR,
                     bytes=len(media.payload), chunk=media.chunk)
            return
        analysis = self._analyzer.analyze(
            media.payload, self._reference.pop_frame(), self.turns.bot_audible, trio.current_time() * 1000
        )
        if analysis.onset:
            self.feed(VoiceOnset(self.settings.barge_in_voice_frames * twilio.MEDIA_FRAME_MS))
        self.feed(Tick())
        disposition = self.turns.inbound_disposition(analysis.caller_audio)
        if disposition is InboundDisposition.AUDIO:
            self._send_to_model(protocol.input_audio_append(media.payload))
        elif disposition is InboundDisposition.SILENCE:
            self._send_to_model(protocol.input_audio_append(SILENT_FRAME))

    async def _model_reader(self, model: WebSocketConnection) -> None:
        with model_link_lost_on_close():
            while True:
                self._on_model_message(await model.get_message())

    def _on_model_message(self, text: str | bytes) -> None:
        try:
            event = protocol.parse_server_event(text)
        except protocol.ModelProtocolError as error:
            self.log("MODEL", "bad event from model skipped", level=logging.ERROR, why=str(error))
            return
        if isinstance(event, protocol.UnknownServerEvent):
            self.log("MODEL", "unknown event type skipped", level=logging.WARNING, type=event.type)
            return
        if isinstance(event, protocol.LooseServerEvent):
            self.log("MODEL", "event outside the SDK's schema, read leniently", level=logging.WARNING,
                     type=event.type, why=event.validation_error)
        try:
            turn_event = to_turn_event(event)
        except protocol.ModelProtocolError as error:
            self.log("MODEL", "bad event from model skipped", level=logging.ERROR, type=event.type, why=str(error))
            return
        if turn_event is not None:
            self.feed(turn_event)
        elif event.type == "input_audio_buffer.speech_started":
            self.log("MODEL", "model heard the caller start speaking", audio_start_ms=event.audio_start_ms)

    async def _model_link(self, model: WebSocketConnection, reopen_model: ModelOpener | None,
                          reconnect: int = 1) -> None:
        """The model socket's reader, writer and keepalive; a lost link is reopened while reconnects are left."""
        try:
            async with trio.open_nursery() as link:
                link.start_soon(self._model_reader, model)
                link.start_soon(self._model_writer, model)
                link.start_soon(self._model_keepalive, model)
        except* ModelLinkLost as group:
            lost = group.exceptions[0]
        if reopen_model is None or reconnect > MODEL_RECONNECTS:
            raise lost
        self._model_link_up = False
        self.log("MODEL", "model link lost, reopening it", level=logging.WARNING, why=str(lost), reconnect=reconnect)
        try:
            async with reopen_model() as reopened:
                self._forget_queued_model_events()
                self._model_link_up = True
                self.feed(ModelReconnected())
                await self._model_link(reopened, reopen_model, reconnect + 1)
        except (OSError, HandshakeError) as error:
            raise ModelLinkLost(f"{lost}; reopening it failed: {error!r}") from None

    def _forget_queued_model_events(self) -> None:
        """What was queued for the lost session: the new one is told the call so far instead."""
        while True:
            try:
                self._model_out.receive_nowait()
            except trio.WouldBlock:
                return

    async def _model_writer(self, model: WebSocketConnection) -> None:
        with model_link_lost_on_close():
            async for event in self._model_out:
                await model.send_message(protocol.encode(event))

    async def _model_keepalive(self, model: WebSocketConnection) -> None:
        with model_link_lost_on_close():
            while True:
                await trio.sleep(MODEL_PING_INTERVAL_S)
                with trio.move_on_after(MODEL_PONG_TIMEOUT_S) as waited:
                    await model.ping()
                if waited.cancelled_caught:
                    raise ModelLinkLost(f"no pong from the model within {MODEL_PONG_TIMEOUT_S} s")


def _optional_int(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() else None
