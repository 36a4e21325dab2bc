"""One frozen settings object, read from the environment with the seed's defaults."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Mapping


class SettingsError(ValueError):
    """A setting in the environment has a value we cannot use."""


GREETING_LOCK_MODES = ("silence", "drop", "pass")
ECHO_GATE_MODES = ("reference", "rms")


@dataclass(frozen=True)
class Settings:
    # Server
    host: str = "127.0.0.1"
    port: int = 8080
    public_host: str = "localhost:8080"
    twilio_auth_token: str = field(default="", repr=False)
    stream_token_secret: str = field(default="", repr=False)
    log_level: str = "INFO"

    # Model connection
    openai_api_key: str = field(default="", repr=False)
    realtime_url: str = "wss://api.openai.com/v1/realtime"
    realtime_model: str = "gpt-realtime-2.1"
    instructions: str = (
        "You are a friendly phone assistant. Greet the caller briefly, then answer "
        "their questions in short spoken sentences."
    )
    voice: str = "marin"
    closing_instructions: str = (
        "The call must end now. Say one short, polite goodbye in the caller's language, and nothing else."
    )
    apology_text: str = "Sorry, we cannot take your call right now. Please try again later."
    fallback_dial: str = ""  # a number that takes the call, after the apology, when the bot cannot
    input_transcription_model: str = "gpt-4o-mini-transcribe"  # the caller's words, for the records; "": none
    server_vad_threshold: float = 0.82
    server_vad_prefix_padding_ms: int = 300
    server_vad_silence_duration_ms: int = 650

    # Turn-taking (the seed's balanced values)
    enable_barge_in: bool = True
    barge_in_voice_frames: int = 6
    barge_in_debounce_ms: int = 350
    echo_gate_min_rms: float = 200.0
    echo_gate_mode: str = "reference"
    vad_aggressiveness: int = 2
    greeting_lock_mode: str = "silence"
    first_utterance_safety_margin_ms: int = 2000
    first_response_max_retries: int = 2
    playback_lead_ms: int = 200
    playback_chunk_ms: int = 100
    max_call_s: float = 600.0
    model_reply_timeout_s: float = 6.0  # a reply owed and no sign of it from the model: ask once more, then end
    max_connections: int = 1000  # per process, HTTP and WebSocket; above it a connection is closed at once
    max_connections_per_ip: int = 100  # 0: no cap, for a process behind a proxy that connects for everyone
    max_calls: int = 40  # per process: measured at some 24 ms of CPU per call-second, 41 calls fill a core
    drain_s: float = 300.0

    # Storage
    database_url: str = "sqlite:///callgate.db"
    spill_dir: str = "callgate-spill"  # records the database could not take wait here for it
    writer_capacity: int = 10_000  # records per writer queue in memory; past it they spill to disk

    # WhatsApp broadcasts (the seed's 2 msg/s and 3 retries)
    default_region: str = "IL"
    whatsapp_api_base: str = "https://graph.facebook.com"
    whatsapp_api_version: str = "v21.0"
    whatsapp_phone_number_id: str = ""
    whatsapp_access_token: str = field(default="", repr=False)
    whatsapp_app_secret: str = field(default="", repr=False)
    whatsapp_verify_token: str = field(default="", repr=False)
    broadcast_rate_limit: float = 2.0
    broadcast_max_retries: int = 3
    broadcast_lease_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"CALLGATE_PORT must be 0-65535 (0: any free port), got {self.port}")
        if self.greeting_lock_mode not in GREETING_LOCK_MODES:
            raise SettingsError(
                f"CALLGATE_GREETING_LOCK_MODE must be one of {', '.join(GREETING_LOCK_MODES)}, "
                f"got {self.greeting_lock_mode!r}"
            )
        if self.echo_gate_mode not in ECHO_GATE_MODES:
            raise SettingsError(
                f"CALLGATE_ECHO_GATE_MODE must be one of {', '.join(ECHO_GATE_MODES)}, "
                f"got {self.echo_gate_mode!r}"
            )
        if not 0 <= self.vad_aggressiveness <= 3:
            raise SettingsError(
                f"CALLGATE_VAD_AGGRESSIVENESS must be 0-3, got {self.vad_aggressiveness}"
            )
        if not 0.0 <= self.server_vad_threshold <= 1.0:
            raise SettingsError(
                f"CALLGATE_SERVER_VAD_THRESHOLD must be 0.0-1.0, got {self.server_vad_threshold}"
            )
        if self.barge_in_voice_frames < 1:
            raise SettingsError(
                f"CALLGATE_BARGE_IN_VOICE_FRAMES must be at least 1, got {self.barge_in_voice_frames}"
            )
        if self.broadcast_rate_limit <= 0:
            raise SettingsError(f"BROADCAST_RATE_LIMIT must be above 0 messages/s, got {self.broadcast_rate_limit}")
        if self.broadcast_max_retries < 0:
            raise SettingsError(f"BROADCAST_MAX_RETRIES must be 0 or more, got {self.broadcast_max_retries}")
        if self.broadcast_lease_s <= 0:
            raise SettingsError(f"BROADCAST_LEASE_S must be above 0, got {self.broadcast_lease_s}")
        if self.max_connections < 1:
            raise SettingsError(f"CALLGATE_MAX_CONNECTIONS must be at least 1, got {self.max_connections}")
        if self.max_connections_per_ip < 0:
            raise SettingsError(
                f"CALLGATE_MAX_CONNECTIONS_PER_IP must be 0 (no cap) or more, got {self.max_connections_per_ip}")
        if self.max_calls < 1:
            raise SettingsError(f"CALLGATE_MAX_CALLS must be at least 1, got {self.max_calls}")
        if self.writer_capacity < 1:
            raise SettingsError(f"CALLGATE_WRITER_CAPACITY must be at least 1, got {self.writer_capacity}")
        if self.drain_s < 0:
            raise SettingsError(f"CALLGATE_DRAIN_S must be 0 or more, got {self.drain_s}")
        if self.model_reply_timeout_s <= 0:
            raise SettingsError(f"CALLGATE_MODEL_REPLY_TIMEOUT_S must be above 0, got {self.model_reply_timeout_s}")
        if self.max_call_s <= 0:
            raise SettingsError(f"CALLGATE_MAX_CALL_S must be above 0, got {self.max_call_s}")
        if self.playback_chunk_ms < 20 or self.playback_chunk_ms % 20:
            raise SettingsError(
                f"CALLGATE_PLAYBACK_CHUNK_MS must be a positive multiple of 20, got {self.playback_chunk_ms}"
            )

    def missing_for_production(self) -> list[str]:
        """What a server on a real number needs and these settings lack, each with its consequence."""
        missing = []
        if not self.twilio_auth_token:
            missing.append("CALLGATE_TWILIO_AUTH_TOKEN (unsigned webhooks would be served: anyone could place calls)")
        if not self.openai_api_key:
            missing.append("OPENAI_API_KEY (callers would hear the built-in local model)")
        if self.public_host == Settings.public_host:
            missing.append("CALLGATE_PUBLIC_HOST (Twilio could reach neither the stream nor the signed URLs)")
        return missing

    @property
    def uses_local_model(self) -> bool:
        """No key means the built-in local model stands in for OpenAI."""
        return not self.openai_api_key

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        """Read CALLGATE_* (and OPENAI_API_KEY, DATABASE_URL) from the environment."""
        environ = os.environ if environ is None else environ
        values = {}
        for settings_field in dataclasses.fields(cls):
            name = _env_name(settings_field.name)
            if name in environ:
                values[settings_field.name] = _parse(name, environ[name], settings_field.type)
        return cls(**values)


_UNPREFIXED = {
    "openai_api_key": "OPENAI_API_KEY",
    "database_url": "DATABASE_URL",
    "whatsapp_api_base": "WHATSAPP_API_BASE",
    "whatsapp_api_version": "WHATSAPP_API_VERSION",
    "whatsapp_phone_number_id": "WHATSAPP_PHONE_NUMBER_ID",
    "whatsapp_access_token": "WHATSAPP_ACCESS_TOKEN",
    "whatsapp_app_secret": "WHATSAPP_APP_SECRET",
    "whatsapp_verify_token": "WHATSAPP_VERIFY_TOKEN",
    "broadcast_rate_limit": "BROADCAST_RATE_LIMIT",
    "broadcast_max_retries": "BROADCAST_MAX_RETRIES",
    "broadcast_lease_s": "BROADCAST_LEASE_S",
}


def _env_name(field_name: str) -> str:
    return _UNPREFIXED.get(field_name, "CALLGATE_" + field_name.upper())


def _parse(name: str, raw: str, type_name: str) -> object:
    text = raw.strip()
    if type_name == "str":
        return raw
    if type_name == "bool":
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{name} must be true or false, got {raw!r}")
    converters = {"int": (int, "a whole number"), "float": (float, "a number")}
    convert, expected = converters[type_name]
    try:
        return convert(text)
    except ValueError:
        raise SettingsError(f"{name} must be {expected}, got {raw!r}") from None
