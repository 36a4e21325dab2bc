"""Translate the model's typed server events into turn events (or nothing the turns care about)."""

from __future__ import annotations

import base64
from typing import Any

from app.turn_events import (
    AudioDelta, AudioDone, ModelError, OutputItemAdded, ResponseCreated, ResponseDone, TranscriptDone, TurnEvent,
)


def to_turn_event(event: Any) -> TurnEvent | None:
    """The turn event for a parsed server event; None for events that only inform (logged elsewhere).

    Raises AttributeError (or binascii.Error) when a loosely read event lacks what the turns need.
    """
    match event.type:
        case "response.created":
            return ResponseCreated(event.response.id or "")
        case "response.output_item.added":
            return OutputItemAdded(event.response_id, event.item.id or "")
        case "response.output_audio.delta":
            return AudioDelta(event.response_id, event.item_id, base64.b64decode(event.delta))
        case "response.output_audio.done":
            return AudioDone(event.response_id)
        case "response.output_audio_transcript.done":
            return TranscriptDone(event.response_id, event.item_id, event.transcript)
        case "response.done":
            return ResponseDone(event.response.id or "", event.response.status or "completed")
        case "error":
            return ModelError(event.error.code or event.error.type, event.error.message, event.error.event_id or "")
    return None
