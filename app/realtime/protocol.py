"""OpenAI Realtime (GA), sans-io: the client events we send, and server events parsed with the SDK's types."""

from __future__ import annotations

import base64
import json
import typing
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Annotated, Any, Union

import pydantic
from openai.types.realtime import RealtimeClientEvent, RealtimeServerEvent
from pydantic import Field, TypeAdapter

from app.settings import Settings



def _union_members(sdk_union: Any) -> tuple:
    return typing.get_args(typing.get_args(sdk_union)[0])


def _tagged_union(members: tuple) -> TypeAdapter:
    """A tagged union on `type` validates ~40x faster than trying every member: fast enough per audio delta."""
    return TypeAdapter(Annotated[Union[members], Field(discriminator="type")])


_SERVER_EVENT_MEMBERS = _union_members(RealtimeServerEvent)
_SERVER_EVENTS = _tagged_union(_SERVER_EVENT_MEMBERS)
CLIENT_EVENTS = _tagged_union(_union_members(RealtimeClientEvent))
KNOWN_SERVER_EVENT_TYPES = frozenset(
    typing.get_args(member.model_fields["type"].annotation)[0] for member in _SERVER_EVENT_MEMBERS
)
_BETA_ALIASES = {
    "response.audio.delta": "response.output_audio.delta",
    "response.audio.done": "response.output_audio.done",
    "response.audio_transcript.delta": "response.output_audio_transcript.delta",
    "response.audio_transcript.done": "response.output_audio_transcript.done",
}


class ModelProtocolError(ValueError):
    """A frame from the model is not a valid Realtime server event."""


@dataclass(frozen=True, slots=True)
class UnknownServerEvent:
    """An event type this SDK version does not know: logged and skipped, never fatal."""

    type: str
    raw: dict


class LooseServerEvent(SimpleNamespace):
    """A known event that failed the SDK's closed schema (a newer enum value, say), read attribute by attribute.

    Dropping a `response.done` because of one unknown enum would leave its response active forever.
    """

    def __init__(self, raw: dict, validation_error: str) -> None:
        super().__init__(**{key: _loose(value) for key, value in raw.items()})
        self.validation_error = validation_error


def _loose(value: Any) -> Any:
    if isinstance(value, dict):
        return SimpleNamespace(**{key: _loose(inner) for key, inner in value.items()})
    if isinstance(value, list):
        return [_loose(inner) for inner in value]
    return value


def parse_server_event(text: str | bytes) -> Any:
    """Parse one server frame into the SDK's typed event; UnknownServerEvent for a newer type,
    LooseServerEvent for a known type that fails the schema. Raises ModelProtocolError for non-events."""
    try:
        message = json.loads(text)
    except json.JSONDecodeError as error:
        raise ModelProtocolError(f"malformed JSON from model: {error}") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ModelProtocolError("model frame is not an object with a string 'type'")
    message["type"] = _BETA_ALIASES.get(message["type"], message["type"])
    if message["type"] not in KNOWN_SERVER_EVENT_TYPES:
        return UnknownServerEvent(type=message["type"], raw=message)
    try:
        return _SERVER_EVENTS.validate_python(message)
    except pydantic.ValidationError as error:
        first = error.errors()[0]
        return LooseServerEvent(message, f"{error.error_count()} errors, first: {first['loc']} {first['msg']}")


def encode(event: dict) -> str:
    return json.dumps(event, separators=(",", ":"))


def session_update(settings: Settings) -> dict:
    """Mu-law both ways so the hot path never resamples; server VAD answers turns but never interrupts;
    the caller's turns transcribed, for the records."""
    update = {
        "type": "session.update",
        "session": {
            "type": "realtime",
            "instructions": settings.instructions,
            "output_modalities": ["audio"],
            "audio": {
                "input": {
                    "format": {"type": "audio/pcmu"},
                    "turn_detection": {
                        "type": "server_vad",
                        "threshold": settings.server_vad_threshold,
                        "prefix_padding_ms": settings.server_vad_prefix_padding_ms,
                        "silence_duration_ms": settings.server_vad_silence_duration_ms,
                        "create_response": True,
                        "interrupt_response": False,
                    },
                },
                "output": {"format": {"type": "audio/pcmu"}, "voice": settings.voice},
            },
        },
    }
    if settings.input_transcription_model:
        update["session"]["audio"]["input"]["transcription"] = {"model": settings.input_transcription_model}
    return update


def input_audio_append(payload: bytes) -> dict:
    return {"type": "input_audio_buffer.append", "audio": base64.b64encode(payload).decode("ascii")}


def response_create(instructions: str | None = None) -> dict:
    """A response; `instructions` replace the session's for this response only."""
    if instructions is None:
        return {"type": "response.create"}
    return {"type": "response.create", "response": {"instructions": instructions}}


def response_cancel(response_id: str) -> dict:
    return {"type": "response.cancel", "response_id": response_id}


def item_truncate(item_id: str, audio_end_ms: int) -> dict:
    return {"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0, "audio_end_ms": audio_end_ms}


def item_delete(item_id: str) -> dict:
    return {"type": "conversation.item.delete", "item_id": item_id}


def user_text_item(text: str) -> dict:
    return {
        "type": "conversation.item.create",
        "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]},
    }


def assistant_text_item(text: str) -> dict:
    """What the bot said, as text: a new session's memory of a conversation it did not hold."""
    return {
        "type": "conversation.item.create",
        "item": {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]},
    }
