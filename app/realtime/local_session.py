"""The local model's protocol logic, sans-io: one client message in, the server events it causes out.

One `LocalSession` is one Realtime WebSocket session. It owns the session config, the conversation,
the input audio buffer with its VAD, and at most one active response. It never sleeps and never
touches a socket: the server feeds it messages, calls `stream_step()` at its own pace while
`active_response_id` is set, and sends whatever comes back.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import typing
from typing import Callable

import numpy as np
import pydantic

from app.realtime.protocol import CLIENT_EVENTS
from app.realtime.local_config import DEFAULT_SERVER_VAD, default_session, updated_session
from app.realtime.local_events import Refusal, error_event, new_id, server_event
from app.realtime.local_response import BYTES_PER_MS, CLIP_RATE_HZ, PCM_RATE_HZ, CannedAnswer, ResponseStream
from app.realtime.local_vad import EnergyVad, SpeechStarted
from dsp.g711 import ulaw_decode
from dsp.resample import StreamingResampler


MIN_COMMIT_MS = 100


class LocalSession:
    """The state of one session; see the module docstring for how the server drives it."""

    def __init__(
        self, *, greeting: CannedAnswer, answer: CannedAnswer, model: str, now_s: float, audio_delta_ms: int = 150
    ) -> None:
        self.greeting = greeting
        self.answer = answer
        self.audio_delta_ms = audio_delta_ms
        self.session_id = new_id("sess")
        self.conversation_id = new_id("conv")
        self.config = default_session(self.session_id, model, now_s)
        self.items: dict[str, dict] = {}
        self.assistant_audio: dict[str, tuple[CannedAnswer, int]] = {}
        self.response: ResponseStream | None = None
        self.responses_started = 0
        self.buffered_ms = 0.0
        self.buffer_start_ms = 0
        self.speech_item_id: str | None = None
        self.vad = EnergyVad(DEFAULT_SERVER_VAD["threshold"], DEFAULT_SERVER_VAD["silence_duration_ms"])
        self._input_resampler = StreamingResampler(PCM_RATE_HZ, CLIP_RATE_HZ)
        self._handlers: dict[str, Callable[[typing.Any, dict], list[dict]]] = {
            "session.update": self._session_update,
            "input_audio_buffer.append": self._append,
            "input_audio_buffer.commit": self._commit_request,
            "input_audio_buffer.clear": self._clear,
            "response.create": self._response_create,
            "response.cancel": self._response_cancel,
            "conversation.item.create": self._item_create,
            "conversation.item.truncate": self._item_truncate,
            "conversation.item.delete": self._item_delete,
            "conversation.item.retrieve": self._item_retrieve,
            "output_audio_buffer.clear": self._output_audio_buffer_clear,
        }

    @property
    def active_response_id(self) -> str | None:
        return self.response.response_id if self.response else None

    @property
    def turn_detection(self) -> dict | None:
        return self.config["audio"]["input"]["turn_detection"]

    def open(self) -> list[dict]:
        return [server_event("session.created", session=self.config)]

    def receive(self, text: str | bytes) -> list[dict]:
        """Handle one client message. A bad one yields a single `error` event and changes nothing."""
        try:
            message = json.loads(text)
        except ValueError as error:
            explanation = f"Invalid JSON in client event: {error}. Send one JSON object per message."
            return [error_event(explanation, code="invalid_json")]
        event_id = message.get("event_id") if isinstance(message, dict) else None
        event_id = event_id if isinstance(event_id, str) else None
        try:
            event = self._validate(message)
            return self._handlers[message["type"]](event, message)
        except Refusal as refusal:
            return [error_event(refusal.message, code=refusal.code, param=refusal.param, client_event_id=event_id)]

    def _validate(self, message: object) -> typing.Any:
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            raise Refusal("Missing required parameter: 'type'.", code="missing_required_parameter", param="type")
        if message["type"] not in self._handlers:
            supported = ", ".join(f"'{name}'" for name in self._handlers)
            explanation = f"Invalid value: '{message['type']}'. Supported values are: {supported}."
            raise Refusal(explanation, code="invalid_value", param="type")
        try:
            return CLIENT_EVENTS.validate_python(message)
        except pydantic.ValidationError as error:
            first = error.errors()[0]
            param = ".".join(str(part) for part in first["loc"][1:])
            if first["type"] == "missing":
                raise Refusal(f"Missing required parameter: '{param}'.", code="missing_required_parameter", param=param)
            raise Refusal(f"Invalid value for '{param}': {first['msg']}.", code="invalid_value", param=param)

    def stream_step(self) -> list[dict]:
        """The active response's next audio delta, or its closing events once all audio is out."""
        if self.response is None:
            return []
        if not self.response.audio_finished:
            return self.response.next_deltas()
        return self._end_response("completed", None)

    # Session

    def _session_update(self, event: typing.Any, message: dict) -> list[dict]:
        self.config = updated_session(self.config, message["session"])
        if self.turn_detection is not None:
            self.vad.reconfigure(self.turn_detection["threshold"], self.turn_detection["silence_duration_ms"])
        return [server_event("session.updated", session=self.config)]

    # Input audio buffer

    def _append(self, event: typing.Any, message: dict) -> list[dict]:
        try:
            payload = base64.b64decode(event.audio, validate=True)
        except binascii.Error:
            raise Refusal("Invalid 'audio': expected base64 audio.", code="invalid_value", param="audio") from None
        format_type = self.config["audio"]["input"]["format"]["type"]
        if format_type == "audio/pcm" and len(payload) % 2:
            raise Refusal("Invalid 'audio': audio/pcm needs whole 16-bit samples.", code="invalid_value", param="audio")
        self.buffered_ms += len(payload) / BYTES_PER_MS[format_type]
        events: list[dict] = []
        for boundary in self.vad.feed(self._decode_input(payload, format_type)):
            if self.turn_detection is None:
                continue
            if isinstance(boundary, SpeechStarted):
                events += self._speech_started(boundary.onset_ms)
            else:
                events += self._speech_stopped(boundary.audio_end_ms)
        return events

    def _decode_input(self, payload: bytes, format_type: str) -> np.ndarray:
        """Input audio as 8 kHz int16, the rate the VAD frames are cut at."""
        if format_type == "audio/pcmu":
            return ulaw_decode(np.frombuffer(payload, dtype=np.uint8))
        return self._input_resampler.process(np.frombuffer(payload, dtype="<i2"))

    def _speech_started(self, onset_ms: int) -> list[dict]:
        item_id = self.speech_item_id = new_id("item")
        audio_start_ms = max(onset_ms - self.turn_detection["prefix_padding_ms"], self.buffer_start_ms)
        events = [server_event("input_audio_buffer.speech_started", audio_start_ms=audio_start_ms, item_id=item_id)]
        if self.turn_detection["interrupt_response"] and self.response is not None:
            events += self._end_response("cancelled", "turn_detected")
        return events

    def _speech_stopped(self, audio_end_ms: int) -> list[dict]:
        item_id = self.speech_item_id or new_id("item")
        events = [server_event("input_audio_buffer.speech_stopped", audio_end_ms=audio_end_ms, item_id=item_id)]
        events += self._commit(item_id)
        if self.turn_detection["create_response"] and self.response is None:
            events += self._start_response()
        return events

    def _commit_request(self, event: typing.Any, message: dict) -> list[dict]:
        if self.buffered_ms < MIN_COMMIT_MS:
            raise Refusal(
                f"Error committing input audio buffer: buffer too small. Expected at least {MIN_COMMIT_MS}ms of "
                f"audio, but buffer only has {self.buffered_ms:.2f}ms of audio.",
                code="input_audio_buffer_commit_empty",
            )
        return self._commit(self.speech_item_id or new_id("item"))

    def _commit(self, item_id: str) -> list[dict]:
        """Turn the buffered audio into a user item and start a new, empty buffer."""
        previous_item_id = self._last_item_id()
        item = {
            "id": item_id,
            "type": "message",
            "object": "realtime.item",
            "status": "completed",
            "role": "user",
            "content": [{"type": "input_audio", "transcript": None}],
        }
        self.items[item_id] = item
        self._reset_buffer()
        return [
            server_event("input_audio_buffer.committed", item_id=item_id, previous_item_id=previous_item_id),
            server_event("conversation.item.added", previous_item_id=previous_item_id, item=item),
            server_event("conversation.item.done", previous_item_id=previous_item_id, item=item),
        ]

    def _clear(self, event: typing.Any, message: dict) -> list[dict]:
        self._reset_buffer()
        return [server_event("input_audio_buffer.cleared")]

    def _reset_buffer(self) -> None:
        self.buffered_ms = 0.0
        self.buffer_start_ms = self.vad.clock_ms
        self.speech_item_id = None
        self.vad.reset()

    # Responses

    def _response_create(self, event: typing.Any, message: dict) -> list[dict]:
        if self.response is not None:
            raise Refusal(
                f"Conversation already has an active response in progress: {self.response.response_id}. "
                "Wait until the response is finished before creating a new one.",
                code="conversation_already_has_active_response",
            )
        return self._start_response()

    def _start_response(self) -> list[dict]:
        """The greeting clip for the session's first response, the answer clip for every later one."""
        self.response = ResponseStream(
            response_id=new_id("resp"),
            item_id=new_id("item"),
            conversation_id=self.conversation_id,
            answer=self.greeting if self.responses_started == 0 else self.answer,
            output_format=copy.deepcopy(self.config["audio"]["output"]["format"]),
            voice=self.config["audio"]["output"]["voice"],
            delta_ms=self.audio_delta_ms,
        )
        self.responses_started += 1
        previous_item_id = self._last_item_id()
        self.items[self.response.item_id] = self.response.item("in_progress", None)
        return self.response.opening_events(previous_item_id)

    def _response_cancel(self, event: typing.Any, message: dict) -> list[dict]:
        if self.response is None or event.response_id not in (None, self.response.response_id):
            raise Refusal("Cancellation failed: no active response found", code="response_cancel_not_active")
        return self._end_response("cancelled", "client_cancelled")

    def _end_response(self, status: str, reason: str | None) -> list[dict]:
        stream, self.response = self.response, None
        item_status = "completed" if status == "completed" else "incomplete"
        if stream.item_id in self.items:
            self.items[stream.item_id] = stream.final_item(item_status)
            self.assistant_audio[stream.item_id] = (stream.answer, stream.generated_ms)
        return stream.closing_events(status, reason, self._previous_item_id(stream.item_id))

    # Conversation

    def _item_create(self, event: typing.Any, message: dict) -> list[dict]:
        item = {**message["item"], "object": "realtime.item", "status": "completed"}
        item.setdefault("id", new_id("item"))
        if item["id"] in self.items:
            raise Refusal(f"Item with id '{item['id']}' already exists.", code="invalid_value", param="item.id")
        if event.previous_item_id not in (None, "root") and event.previous_item_id not in self.items:
            raise Refusal(
                f"Item with id '{event.previous_item_id}' not found.", code="invalid_value", param="previous_item_id"
            )
        previous_item_id = self._last_item_id()
        self.items[item["id"]] = item
        return [
            server_event("conversation.item.added", previous_item_id=previous_item_id, item=item),
            server_event("conversation.item.done", previous_item_id=previous_item_id, item=item),
        ]

    def _item_truncate(self, event: typing.Any, message: dict) -> list[dict]:
        self._require_item(event.item_id)
        if self.response is not None and event.item_id == self.response.item_id:
            explanation = f"Item '{event.item_id}' is still being generated: cancel its response before truncating it."
            raise Refusal(explanation, code="invalid_value", param="item_id")
        if event.item_id not in self.assistant_audio:
            raise Refusal("Only model output audio messages can be truncated.", code="invalid_value", param="item_id")
        if event.content_index != 0:
            explanation = "Invalid 'content_index': the item has one content part, 0."
            raise Refusal(explanation, code="invalid_value", param="content_index")
        answer, generated_ms = self.assistant_audio[event.item_id]
        if not 0 <= event.audio_end_ms <= generated_ms:
            raise Refusal(
                f"Audio content of {generated_ms}ms is already shorter than {event.audio_end_ms}ms",
                code="invalid_value",
                param="audio_end_ms",
            )
        self.assistant_audio[event.item_id] = (answer, event.audio_end_ms)
        heard_content = [{"type": "output_audio", "transcript": answer.transcript_heard(event.audio_end_ms)}]
        # A new dict, not an edit: events already queued may hold the old one.
        self.items[event.item_id] = {**self.items[event.item_id], "content": heard_content}
        return [
            server_event(
                "conversation.item.truncated",
                item_id=event.item_id,
                content_index=event.content_index,
                audio_end_ms=event.audio_end_ms,
            )
        ]

    def _item_delete(self, event: typing.Any, message: dict) -> list[dict]:
        self._require_item(event.item_id)
        del self.items[event.item_id]
        self.assistant_audio.pop(event.item_id, None)
        return [server_event("conversation.item.deleted", item_id=event.item_id)]

    def _item_retrieve(self, event: typing.Any, message: dict) -> list[dict]:
        self._require_item(event.item_id)
        return [server_event("conversation.item.retrieved", item=self.items[event.item_id])]

    def _output_audio_buffer_clear(self, event: typing.Any, message: dict) -> list[dict]:
        explanation = "output_audio_buffer.clear is only supported for WebRTC and SIP sessions."
        raise Refusal(explanation, code="invalid_value", param="type")

    def _require_item(self, item_id: str) -> None:
        if item_id not in self.items:
            raise Refusal(f"Item with item_id '{item_id}' not found.", code="item_not_found", param="item_id")

    def _last_item_id(self) -> str | None:
        return next(reversed(self.items), None)

    def _previous_item_id(self, item_id: str) -> str | None:
        item_ids = list(self.items)
        position = item_ids.index(item_id) if item_id in item_ids else len(item_ids)
        return item_ids[position - 1] if position > 0 else None
