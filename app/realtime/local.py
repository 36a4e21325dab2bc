"""The built-in local model: a Realtime-protocol WebSocket server that answers with packaged speech clips.

Used when no OpenAI key is configured. The call code connects to it exactly as it would to OpenAI
(`ws://127.0.0.1:PORT/v1/realtime?model=...`), and every event it sends is a valid GA server event.
The protocol logic lives in `local_session.LocalSession`; this module only runs the trio loops.
"""

from __future__ import annotations

import json
import logging
import math
import time
from functools import partial
from urllib.parse import parse_qs, urlsplit

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from app.clips import load_clip
from app.logs import log_event
from app.realtime.local_response import CannedAnswer
from app.realtime.local_session import LocalSession

logger = logging.getLogger(__name__)

REALTIME_PATH = "/v1/realtime"
DEFAULT_MODEL = "gpt-realtime-2.1"
# A long audio delta can exceed trio-websocket's 1 MiB default, which would close the socket with 1009.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
CLIP_TRANSCRIPTS = {
    "bot_greeting_en.wav": (
        "Hello, and thank you for calling. I'm the automated assistant, and I can help with your account, "
        "your recent orders, or our opening hours. How can I help you today?"
    ),
    "bot_greeting_he.wav": "שלום, ותודה שהתקשרתם. אני העוזר האוטומטי. איך אפשר לעזור לכם היום?",
    "bot_answer_en.wav": (
        "Of course. Your order was shipped yesterday afternoon and should arrive within two to three business "
        "days. You will get a text message with the tracking number shortly. If it has not arrived by Friday, "
        "call us again and we will send a replacement at no cost. Is there anything else I can help you with?"
    ),
}
FALLBACK_TRANSCRIPT = "Thanks for your question. Let me help you with that right away."
# Events too frequent for one INFO line each: audio in, audio and transcript out.
_QUIET_EVENT_TYPES = frozenset(
    {"input_audio_buffer.append", "response.output_audio.delta", "response.output_audio_transcript.delta"}
)
_LOGGED_FIELDS = ("response_id", "item_id", "audio_start_ms", "audio_end_ms", "previous_item_id")


def canned_answer(clip_name: str) -> CannedAnswer:
    return CannedAnswer(samples=load_clip(clip_name), transcript=CLIP_TRANSCRIPTS.get(clip_name, FALLBACK_TRANSCRIPT))


class LocalRealtimeModel:
    """Serves Realtime sessions that speak `greeting_clip` first and `answer_clip` for every later response.

    `stream_speedup` is how much faster than real time the audio is generated, as OpenAI's is;
    each delta carries `audio_delta_ms` of audio.
    """

    def __init__(
        self,
        greeting_clip: str = "bot_greeting_en.wav",
        answer_clip: str = "bot_answer_en.wav",
        *,
        stream_speedup: float = 4.0,
        audio_delta_ms: int = 150,
    ) -> None:
        if stream_speedup <= 0:
            raise ValueError(f"stream_speedup must be > 0, got {stream_speedup}")
        if audio_delta_ms <= 0:
            raise ValueError(f"audio_delta_ms must be > 0, got {audio_delta_ms}")
        self.greeting = canned_answer(greeting_clip)
        self.answer = canned_answer(answer_clip)
        self.stream_speedup = stream_speedup
        self.audio_delta_ms = audio_delta_ms

    async def serve(self, host: str = "127.0.0.1", port: int = 0, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; reports `ws://HOST:PORT/v1/realtime` through `task_status.started`.

        Each connection is an independent session: an error in one closes only that socket.
        """
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                partial(serve_websocket, self.handle_request, host, port, None, max_message_size=MAX_MESSAGE_BYTES)
            )
            url_host = "127.0.0.1" if host in ("", "0.0.0.0") else host
            task_status.started(f"ws://{url_host}:{server.port}{REALTIME_PATH}")

    def new_session(self, model: str = DEFAULT_MODEL) -> LocalSession:
        return LocalSession(
            greeting=self.greeting,
            answer=self.answer,
            model=model,
            now_s=time.time(),
            audio_delta_ms=self.audio_delta_ms,
        )

    async def handle_request(self, request: WebSocketRequest) -> None:
        """Serve one WebSocket handshake: refuse other paths, else run a session until the socket closes."""
        url = urlsplit(request.path)
        if url.path != REALTIME_PATH:
            await request.reject(404, body=f"Not found: the Realtime endpoint is {REALTIME_PATH}\n".encode())
            return
        model = parse_qs(url.query).get("model", [DEFAULT_MODEL])[0]
        websocket = await request.accept()
        session = self.new_session(model)
        log_event(logger, session.session_id, "LOCAL_MODEL", "session opened", model=model)
        try:
            await SessionConnection(session, websocket, self.stream_speedup).run()
        except Exception:
            # A bug in one session must not reach the server's nursery and end every other call.
            logger.exception("call=%s [LOCAL_MODEL] session failed", session.session_id)
            await websocket.aclose(1011, "local model error")
        log_event(logger, session.session_id, "LOCAL_MODEL", "session closed")


class SessionConnection:
    """Thin trio loops around one `LocalSession`: a reader, a writer and the active response's stream.

    Events go through an unbounded outbox so that a step of the session and the queueing of its
    events happen with no checkpoint between them: a cancelled response's deltas can never be
    queued after its `response.done`.
    """

    def __init__(self, session: LocalSession, websocket: WebSocketConnection, stream_speedup: float) -> None:
        self.session = session
        self.websocket = websocket
        self.delta_interval_s = session.audio_delta_ms / 1000 / stream_speedup
        self._outbox, self._outbox_receiver = trio.open_memory_channel(math.inf)
        self._stream_scope = trio.CancelScope()

    async def run(self) -> None:
        """Serve the session until the client closes the socket."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write_loop, nursery.cancel_scope)
            self._emit(self.session.open())
            try:
                while True:
                    self._receive(await self.websocket.get_message(), nursery)
            except ConnectionClosed:
                nursery.cancel_scope.cancel()

    def _receive(self, message: str | bytes, nursery: trio.Nursery) -> None:
        response_before = self.session.active_response_id
        self._log_received(message)
        self._emit(self.session.receive(message))
        response_after = self.session.active_response_id
        if response_after != response_before:
            self._stream_scope.cancel()
            if response_after is not None:
                self._stream_scope = trio.CancelScope()
                nursery.start_soon(self._stream, response_after, self._stream_scope)

    async def _stream(self, response_id: str, scope: trio.CancelScope) -> None:
        """Step the response at the speedup pace; cancelling `scope` stops it between two deltas."""
        with scope:
            while self.session.active_response_id == response_id:
                self._emit(self.session.stream_step())
                await trio.sleep(self.delta_interval_s)

    def _emit(self, events: list[dict]) -> None:
        for event in events:
            self._log_sent(event)
            self._outbox.send_nowait(event)

    async def _write_loop(self, session_scope: trio.CancelScope) -> None:
        try:
            async for event in self._outbox_receiver:
                await self.websocket.send_message(json.dumps(event, ensure_ascii=False))
        except ConnectionClosed:
            session_scope.cancel()

    def _log_received(self, message: str | bytes) -> None:
        try:
            event_type = str(json.loads(message).get("type"))
        except (ValueError, AttributeError):
            event_type = "(not a JSON object)"
        level = logging.DEBUG if event_type in _QUIET_EVENT_TYPES else logging.INFO
        log_event(logger, self.session.session_id, "LOCAL_MODEL", "received", level=level, type=event_type)

    def _log_sent(self, event: dict) -> None:
        fields = {key: event[key] for key in _LOGGED_FIELDS if event.get(key) is not None}
        if event["type"] == "error":
            fields.update(code=event["error"]["code"], error=event["error"]["message"])
        elif "response" in event:
            fields.update(response_id=event["response"]["id"], status=event["response"]["status"])
        level = logging.DEBUG if event["type"] in _QUIET_EVENT_TYPES else logging.INFO
        log_event(logger, self.session.session_id, "LOCAL_MODEL", "sent", level=level, type=event["type"], **fields)
