"""Settings come from the environment, typed, with the seed's defaults and clear errors."""

from __future__ import annotations

import pytest

from app.call import ModelEndpoint
from app.settings import Settings, SettingsError


def test_the_seeds_defaults():
    settings = Settings.from_env({})
    assert (settings.barge_in_voice_frames, settings.barge_in_debounce_ms) == (6, 350)
    assert (settings.server_vad_threshold, settings.echo_gate_min_rms) == (0.82, 200.0)
    assert (settings.broadcast_rate_limit, settings.broadcast_max_retries) == (2.0, 3)
    assert settings.database_url == "sqlite:///callgate.db" and settings.uses_local_model


def test_values_are_read_typed_from_their_variables():
    settings = Settings.from_env({
        "CALLGATE_PORT": "9000", "CALLGATE_ENABLE_BARGE_IN": "off", "CALLGATE_SERVER_VAD_THRESHOLD": "0.75",
        "OPENAI_API_KEY": "sk-1", "DATABASE_URL": "postgresql://db/x", "BROADCAST_RATE_LIMIT": "80",
        "WHATSAPP_API_BASE": "http://127.0.0.1:9000", "CALLGATE_DEFAULT_REGION": "US"})
    assert (settings.port, settings.enable_barge_in, settings.server_vad_threshold) == (9000, False, 0.75)
    assert not settings.uses_local_model and settings.database_url == "postgresql://db/x"
    assert (settings.broadcast_rate_limit, settings.whatsapp_api_base, settings.default_region) == (
        80.0, "http://127.0.0.1:9000", "US")
    assert "sk-1" not in repr(settings)


@pytest.mark.parametrize("environ, message", [
    ({"CALLGATE_PORT": "abc"}, "CALLGATE_PORT must be a whole number, got 'abc'"),
    ({"CALLGATE_PORT": "70000"}, "CALLGATE_PORT must be 0-65535"),
    ({"CALLGATE_ENABLE_BARGE_IN": "maybe"}, "CALLGATE_ENABLE_BARGE_IN must be true or false"),
    ({"CALLGATE_ECHO_GATE_MODE": "magic"}, "CALLGATE_ECHO_GATE_MODE must be one of reference, rms"),
    ({"CALLGATE_GREETING_LOCK_MODE": "mute"}, "CALLGATE_GREETING_LOCK_MODE must be one of silence, drop, pass"),
    ({"CALLGATE_PLAYBACK_CHUNK_MS": "30"}, "CALLGATE_PLAYBACK_CHUNK_MS must be a positive multiple of 20"),
    ({"BROADCAST_RATE_LIMIT": "0"}, "BROADCAST_RATE_LIMIT must be above 0"),
])
def test_a_bad_value_names_the_variable_and_what_it_must_be(environ, message):
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(environ)


def test_no_secret_shows_in_the_settings_or_the_model_endpoint_repr():
    secrets = {"OPENAI_API_KEY": "sk-secret-1", "CALLGATE_TWILIO_AUTH_TOKEN": "twilio-secret-2",
               "CALLGATE_STREAM_TOKEN_SECRET": "stream-secret-3", "WHATSAPP_ACCESS_TOKEN": "wa-secret-4",
               "WHATSAPP_APP_SECRET": "wa-secret-5", "WHATSAPP_VERIFY_TOKEN": "wa-secret-6"}
    shown = repr(Settings.from_env(secrets)) + repr(ModelEndpoint("wss://x/v1/realtime", "m", "sk-secret-1"))
    assert [value for value in secrets.values() if value in shown] == []


def test_the_maximum_call_duration_is_ten_minutes_and_must_be_positive():
    assert Settings().max_call_s == 600.0
    with pytest.raises(SettingsError, match="CALLGATE_MAX_CALL_S must be above 0, got 0.0"):
        Settings.from_env({"CALLGATE_MAX_CALL_S": "0"})
