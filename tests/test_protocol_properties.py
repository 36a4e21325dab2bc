"""Property tests of the parsers: whatever a carrier or a model sends, the answer is a typed event or the
protocol's own error, which the call logs and skips; never another exception, which would end the call."""

from __future__ import annotations

import base64
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from app.carriers import twilio
from app.model_events import to_turn_event
from app.realtime import protocol
from app.turn_events import (
    AudioDelta, CallerTranscript, CallerTurnCommitted, ModelError, OutputItemAdded, ResponseCreated, ResponseDone,
    TranscriptDone,
)

BASE64_TEXT = st.binary(max_size=12).map(lambda raw: base64.b64encode(raw).decode())
JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | BASE64_TEXT
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12)


def anything_or_shaped(names: list[str]) -> st.SearchStrategy:
    """Any JSON value, or an object with some of the expected fields, each holding any JSON value."""
    return JSON_VALUES | st.fixed_dictionaries({}, optional={name: JSON_VALUES for name in names})


def frames(kind_key: str, shapes: dict[str, dict[str, list[str]]]) -> st.SearchStrategy[str]:
    """JSON objects of each known kind whose expected fields hold anything at all, some of them well formed."""
    def of_kind(kind: str) -> st.SearchStrategy[dict]:
        fields = {name: anything_or_shaped(inner) for name, inner in shapes[kind].items()}
        return st.fixed_dictionaries({kind_key: st.just(kind)}, optional=fields)

    return st.sampled_from(sorted(shapes)).flatmap(of_kind).map(json.dumps)


CARRIER_FRAMES = frames("event", {
    "connected": {"protocol": []},
    "start": {"start": ["streamSid", "callSid", "customParameters", "mediaFormat"], "streamSid": []},
    "media": {"media": ["payload", "timestamp", "chunk", "track"]},
    "mark": {"mark": ["name"]}, "dtmf": {"dtmf": ["digit"]}, "stop": {"stop": ["callSid"]},
})
MODEL_FIELDS = {
    "response": ["id", "status", "output"], "item": ["id", "type"], "error": ["type", "code", "message", "event_id"],
    "response_id": [], "item_id": [], "delta": [], "transcript": [], "event_id": [],
}
MODEL_FRAMES = frames("type", {kind: MODEL_FIELDS for kind in protocol.KNOWN_SERVER_EVENT_TYPES})
ANY_TEXT = st.text() | JSON_VALUES.map(json.dumps)
CARRIER_TEXT_FIELDS = {
    twilio.Start: ["stream_sid", "call_sid", "encoding"], twilio.Mark: ["name"], twilio.Dtmf: ["digit"],
    twilio.Stop: ["call_sid"],
}


@settings(max_examples=400)
@given(CARRIER_FRAMES | ANY_TEXT)
def test_any_carrier_frame_parses_to_an_event_or_a_carrier_protocol_error(text):
    try:
        event = twilio.parse(text)
    except twilio.CarrierProtocolError:
        return
    for name in CARRIER_TEXT_FIELDS.get(type(event), []):
        assert isinstance(getattr(event, name), str), (name, event)
    if isinstance(event, twilio.Start):
        assert all(isinstance(key, str) and isinstance(value, str) for key, value in event.custom_parameters.items())
    if isinstance(event, twilio.Media):
        assert isinstance(event.payload, bytes) and isinstance(event.timestamp_ms, int)


MODEL_TEXT_FIELDS = {
    ResponseCreated: ["response_id"], OutputItemAdded: ["response_id", "item_id"],
    AudioDelta: ["response_id", "item_id"], TranscriptDone: ["response_id", "item_id", "transcript"],
    ResponseDone: ["response_id", "status"], ModelError: ["code", "message", "event_id"],
    CallerTurnCommitted: ["item_id"], CallerTranscript: ["item_id", "transcript"],
}


@settings(max_examples=400)
@given(MODEL_FRAMES | ANY_TEXT)
def test_any_model_frame_becomes_a_well_typed_turn_event_nothing_or_a_model_protocol_error(text):
    try:
        event = protocol.parse_server_event(text)
        if isinstance(event, protocol.UnknownServerEvent):
            return
        turn_event = to_turn_event(event)
    except protocol.ModelProtocolError:
        return
    for name in MODEL_TEXT_FIELDS.get(type(turn_event), []):
        assert isinstance(getattr(turn_event, name), str), (name, turn_event)
    if isinstance(turn_event, AudioDelta):
        assert isinstance(turn_event.audio, bytes)
