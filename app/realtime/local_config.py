"""The local model's session configuration: OpenAI's defaults, and `session.update` merged into them."""

from __future__ import annotations

import copy

from app.realtime.local_events import Refusal
from app.realtime.local_response import BYTES_PER_MS, PCM_RATE_HZ

SESSION_LIFETIME_S = 3600
DEFAULT_SERVER_VAD = {
    "type": "server_vad",
    "threshold": 0.5,
    "prefix_padding_ms": 300,
    "silence_duration_ms": 500,
    "idle_timeout_ms": None,
    "create_response": True,
    "interrupt_response": True,
}
DEFAULT_INSTRUCTIONS = "You are a helpful voice assistant. Speak briefly and clearly."
# A session.update replaces these objects whole instead of merging their fields.
_REPLACED_WHOLE = frozenset({"format", "turn_detection"})
# Settings that null switches off; a null anywhere else in an update leaves the setting as it was.
_NULLABLE = frozenset({"turn_detection", "transcription", "noise_reduction", "tracing", "prompt", "include"})
# Fields the server owns: an update cannot change them.
_SERVER_OWNED = ("type", "object", "id", "model", "expires_at")


def default_session(session_id: str, model: str, now_s: float) -> dict:
    """The session as OpenAI announces it in `session.created`: 24 kHz PCM both ways, server VAD on."""
    return {
        "type": "realtime",
        "object": "realtime.session",
        "id": session_id,
        "model": model,
        "output_modalities": ["audio"],
        "instructions": DEFAULT_INSTRUCTIONS,
        "tools": [],
        "tool_choice": "auto",
        "max_output_tokens": "inf",
        "tracing": None,
        "prompt": None,
        "expires_at": int(now_s) + SESSION_LIFETIME_S,
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": PCM_RATE_HZ},
                "transcription": None,
                "noise_reduction": None,
                "turn_detection": dict(DEFAULT_SERVER_VAD),
            },
            "output": {"format": {"type": "audio/pcm", "rate": PCM_RATE_HZ}, "voice": "marin", "speed": 1.0},
        },
        "include": None,
    }


def merge_session(current: dict, update: dict) -> dict:
    """`current` with `update` merged in field by field; audio formats and turn detection are replaced whole."""
    merged = copy.deepcopy(current)
    for key, value in update.items():
        if value is None and key not in _NULLABLE:
            continue
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key not in _REPLACED_WHOLE:
            merged[key] = merge_session(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def updated_session(current: dict, update: dict) -> dict:
    """The session after a (schema-valid) `session.update`; raises Refusal for what the local model cannot do."""
    if update.get("type") != "realtime":
        raise Refusal(
            "The local model supports session.type 'realtime' only.", code="invalid_value", param="session.type"
        )
    merged = merge_session(current, update)
    for key in _SERVER_OWNED:
        merged[key] = current[key]
    for direction in ("input", "output"):
        audio_format = merged["audio"][direction]["format"]
        if audio_format.get("type") not in BYTES_PER_MS:
            raise Refusal(
                f"Unsupported format {audio_format.get('type')!r} for session.audio.{direction}.format: "
                "the local model speaks 'audio/pcmu' and 'audio/pcm'.",
                code="invalid_value",
                param=f"session.audio.{direction}.format.type",
            )
        if audio_format["type"] == "audio/pcm":
            audio_format["rate"] = PCM_RATE_HZ
    if merged["audio"]["input"]["turn_detection"] is not None:
        merged["audio"]["input"]["turn_detection"] = _server_vad(merged["audio"]["input"]["turn_detection"])
    return merged


def _server_vad(turn_detection: dict) -> dict:
    param = "session.audio.input.turn_detection"
    if turn_detection.get("type") != "server_vad":
        raise Refusal(
            "The local model supports turn_detection 'server_vad' or null only.",
            code="invalid_value",
            param=f"{param}.type",
        )
    turn_detection = {**DEFAULT_SERVER_VAD, **turn_detection}
    if not 0.0 <= turn_detection["threshold"] <= 1.0:
        raise Refusal(
            f"Invalid 'threshold': must be between 0.0 and 1.0, got {turn_detection['threshold']}.",
            code="invalid_value",
            param=f"{param}.threshold",
        )
    for key in ("prefix_padding_ms", "silence_duration_ms"):
        if turn_detection[key] < 0:
            raise Refusal(
                f"Invalid '{key}': must be 0 or more, got {turn_detection[key]}.",
                code="invalid_value",
                param=f"{param}.{key}",
            )
    return turn_detection
