"""The Realtime codec: events we send validate against the SDK; server events parse fast and safely."""

from __future__ import annotations

import json

import pytest

from app.model_events import to_turn_event
from app.realtime import protocol
from app.settings import Settings
from tests.realtime_schemas import SDK_CLIENT_EVENTS
from app.turn_events import ResponseDone



def test_every_client_event_we_build_validates_against_the_openai_types():
    events = [
        protocol.session_update(Settings(voice="cedar", instructions="Be brief.")),
        protocol.input_audio_append(b"\xff" * 160),
        protocol.response_create(),
        protocol.response_cancel("resp_1"),
        protocol.item_truncate("item_1", 1840),
        protocol.item_delete("item_1"),
        protocol.user_text_item("The caller pressed 5."),
    ]
    for event in events:
        SDK_CLIENT_EVENTS.validate_python(json.loads(protocol.encode(event)))
    session = events[0]["session"]
    assert session["type"] == "realtime"
    assert session["audio"]["output"] == {"format": {"type": "audio/pcmu"}, "voice": "cedar"}
    assert session["audio"]["input"]["turn_detection"]["create_response"] is True


def test_audio_delta_parses_to_the_sdk_type_and_the_beta_name_is_read_as_ga():
    delta = {"event_id": "event_1", "response_id": "resp_1", "item_id": "item_1", "output_index": 0,
             "content_index": 0, "delta": "/38="}
    for name in ("response.output_audio.delta", "response.audio.delta"):
        event = protocol.parse_server_event(json.dumps({"type": name, **delta}))
        assert event.type == "response.output_audio.delta" and event.delta == "/38="


def test_an_unknown_event_type_is_returned_for_logging_not_raised():
    event = protocol.parse_server_event('{"type":"response.future_thing","event_id":"e"}')
    assert isinstance(event, protocol.UnknownServerEvent) and event.type == "response.future_thing"


@pytest.mark.parametrize("text", ["nope", '{"no_type":1}', '[1]'])
def test_a_frame_that_is_no_event_raises_a_clear_error(text):
    with pytest.raises(protocol.ModelProtocolError):
        protocol.parse_server_event(text)


def test_a_known_event_with_a_value_newer_than_the_sdk_is_still_read():
    done = {"type": "response.done", "event_id": "event_9", "response": {
        "id": "resp_1", "object": "realtime.response", "status": "cancelled",
        "status_details": {"type": "cancelled", "reason": "a_reason_from_the_future"}}}
    event = protocol.parse_server_event(json.dumps(done))
    assert isinstance(event, protocol.LooseServerEvent)
    assert "status_details" in event.validation_error
    assert to_turn_event(event) == ResponseDone("resp_1", "cancelled")
