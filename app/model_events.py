"""Translate the model's typed server events into turn events (or nothing the turns care about)."""

from __future__ import annotations

import base64
from typing import Any

from app.json_fields import text
from app.realtime.protocol import ModelProtocolError
from app.turn_events import (
    AudioDelta, AudioDone, CallerTranscript, CallerTurnCommitted, ModelError, OutputItemAdded, ResponseCreated,
    ResponseDone, TranscriptDone, TurnEvent,
)


def to_turn_event(event: Any) -> TurnEvent | None:
    """The turn event for a parsed server event; None for events that only inform (logged elsewhere).

    Raises ModelProtocolError when a loosely read event lacks what the turns need or holds the wrong types.
    """
    try:
        return _turn_event(event)
    except (AttributeError, TypeError, ValueError) as error:  # binascii.Error is a ValueError
        raise ModelProtocolError(f"unusable {event.type}: {type(error).__name__} {error}") from None


def _turn_event(event: Any) -> TurnEvent | None:
    match event.type:
        case "response.created":
            return ResponseCreated(text(event.response.id or ""))
        case "response.output_item.added":
            return OutputItemAdded(text(event.response_id), text(event.item.id or ""))
        case "response.output_audio.delta":
            return AudioDelta(text(event.response_id), text(event.item_id), base64.b64decode(text(event.delta)))
        case "response.output_audio.done":
            return AudioDone(text(event.response_id))
        case "response.output_audio_transcript.done":
            return TranscriptDone(text(event.response_id), text(event.item_id), text(event.transcript))
        case "response.done":
            return ResponseDone(text(event.response.id or ""), text(event.response.status or "completed"))
        case "input_audio_buffer.committed":
            return CallerTurnCommitted(text(event.item_id))
        case "conversation.item.input_audio_transcription.completed":
            return CallerTranscript(text(event.item_id), text(event.transcript))
        case "error":
            error = event.error
            return ModelError(text(error.code or error.type), text(error.message), text(error.event_id or ""))
    return None
