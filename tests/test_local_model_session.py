"""The local model's session logic, sans-io: responses, cancel, truncate, the conversation and errors."""

from __future__ import annotations

import base64
import json

import pytest

from app.realtime.local import CLIP_TRANSCRIPTS
from tests.test_local_model_helpers import (
    MODEL,
    audio_bytes,
    client,
    clip_pcmu,
    new_session,
    of_type,
    pcmu_session_update,
    silence_pcmu,
    single_error,
    speak,
    start_response,
    stream_to_end,
    user_text,
    validate_all,
)


def test_session_created_announces_openai_defaults():
    session = MODEL.new_session("gpt-realtime-2.1")
    [created] = session.open()
    validate_all([created])
    assert created["type"] == "session.created"
    assert created["event_id"].startswith("event_")
    assert created["session"]["id"].startswith("sess_")
    assert created["session"]["model"] == "gpt-realtime-2.1"
    assert created["session"]["audio"]["output"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert created["session"]["audio"]["input"]["turn_detection"]["type"] == "server_vad"


def test_session_update_merges_and_echoes_the_whole_session():
    session = MODEL.new_session()
    session.open()
    [updated] = session.receive(pcmu_session_update(threshold=0.9))
    validate_all([updated])
    assert updated["type"] == "session.updated"
    config = updated["session"]
    assert config["instructions"] == "Answer briefly."
    assert config["audio"]["input"]["format"] == {"type": "audio/pcmu"}
    assert config["audio"]["output"]["format"] == {"type": "audio/pcmu"}
    assert config["audio"]["input"]["turn_detection"]["threshold"] == 0.9
    assert config["audio"]["input"]["turn_detection"]["interrupt_response"] is False
    assert config["tool_choice"] == "auto"
    assert config["id"] == session.session_id


def test_session_update_with_an_unsupported_format_is_refused_and_changes_nothing():
    session = new_session()
    update = json.loads(pcmu_session_update())
    update["session"]["audio"]["output"]["format"] = {"type": "audio/pcma"}
    error = single_error(session.receive(json.dumps(update)))
    assert error["param"] == "session.audio.output.format.type"
    assert session.config["audio"]["output"]["format"] == {"type": "audio/pcmu"}


def test_a_response_streams_the_whole_clip_and_its_transcript():
    session = new_session()
    events = session.receive(client({"type": "response.create"})) + stream_to_end(session)
    validate_all(events)
    response_id = events[0]["response"]["id"]
    assert response_id.startswith("resp_")
    assert audio_bytes(events, response_id) == clip_pcmu("bot_greeting_en.wav")
    transcript = "".join(event["delta"] for event in of_type(events, "response.output_audio_transcript.delta"))
    assert transcript == CLIP_TRANSCRIPTS["bot_greeting_en.wav"]
    assert of_type(events, "response.output_audio_transcript.done")[0]["transcript"] == transcript
    closing = [event["type"] for event in events[-6:]]
    assert closing == [
        "response.output_audio.done",
        "response.output_audio_transcript.done",
        "response.content_part.done",
        "response.output_item.done",
        "conversation.item.done",
        "response.done",
    ]
    done = events[-1]["response"]
    assert done["status"] == "completed"
    assert done["output"][0]["status"] == "completed"
    assert done["output"][0]["content"] == [{"type": "output_audio", "transcript": transcript}]


def test_deltas_carry_a_bounded_slice_of_audio():
    session = new_session()
    session.receive(client({"type": "response.create"}))
    deltas = of_type(stream_to_end(session), "response.output_audio.delta")
    sizes = {len(base64.b64decode(delta["delta"])) for delta in deltas[:-1]}
    assert sizes == {150 * 8}


def test_the_first_response_is_the_greeting_and_later_ones_the_answer():
    session = new_session()
    first = session.receive(client({"type": "response.create"})) + stream_to_end(session)
    second = session.receive(client({"type": "response.create"})) + stream_to_end(session)
    assert audio_bytes(first, first[0]["response"]["id"]) == clip_pcmu("bot_greeting_en.wav")
    assert audio_bytes(second, second[0]["response"]["id"]) == clip_pcmu("bot_answer_en.wav")
    assert second[2]["previous_item_id"] == first[1]["item"]["id"]


def test_a_second_response_create_while_one_is_active_is_refused():
    session = new_session()
    _, response_id, _ = start_response(session)
    error = single_error(session.receive(client({"type": "response.create"})))
    assert error["code"] == "conversation_already_has_active_response"
    assert session.active_response_id == response_id


def test_cancel_ends_the_response_cancelled_with_what_was_streamed():
    session = new_session()
    streamed, response_id, item_id = start_response(session)
    events = session.receive(client({"type": "response.cancel", "response_id": response_id}))
    validate_all(events)
    [done] = of_type(events, "response.done")
    assert events[-1] is done
    assert done["response"]["status"] == "cancelled"
    assert done["response"]["status_details"]["reason"] == "client_cancelled"
    assert done["response"]["output"][0]["status"] == "incomplete"
    assert not of_type(events, "response.output_audio.delta")
    assert session.stream_step() == []
    assert session.assistant_audio[item_id][1] == 2 * 150


def test_cancel_without_an_id_cancels_the_active_response():
    session = new_session()
    _, response_id, _ = start_response(session)
    [done] = of_type(session.receive(client({"type": "response.cancel"})), "response.done")
    assert done["response"]["id"] == response_id


@pytest.mark.parametrize("response_id", [None, "resp_notTheActiveOne"])
def test_cancel_with_nothing_to_cancel_is_response_cancel_not_active(response_id):
    session = new_session()
    if response_id is not None:
        start_response(session)
    cancel = {"type": "response.cancel", **({"response_id": response_id} if response_id else {})}
    error = single_error(session.receive(client(cancel)))
    assert error["code"] == "response_cancel_not_active"


def test_truncate_within_the_generated_audio_shortens_the_transcript():
    session = new_session()
    session.receive(client({"type": "response.create"}))
    events = stream_to_end(session)
    item_id = events[-1]["response"]["output"][0]["id"]
    [truncated] = session.receive(
        client({"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0, "audio_end_ms": 2000})
    )
    validate_all([truncated])
    assert truncated == {**truncated, "type": "conversation.item.truncated", "item_id": item_id, "audio_end_ms": 2000}
    heard = session.items[item_id]["content"][0]["transcript"]
    assert heard and CLIP_TRANSCRIPTS["bot_greeting_en.wav"].startswith(heard)
    assert len(heard) < len(CLIP_TRANSCRIPTS["bot_greeting_en.wav"]) / 2


def test_truncate_of_an_item_still_being_generated_asks_for_a_cancel_first():
    session = new_session()
    _, _, item_id = start_response(session)
    truncate = {"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0, "audio_end_ms": 100}
    assert "cancel its response" in single_error(session.receive(client(truncate)))["message"]
    session.receive(client({"type": "response.cancel"}))
    assert session.receive(client(truncate))[0]["type"] == "conversation.item.truncated"


def test_truncate_beyond_the_generated_audio_is_an_error():
    session = new_session()
    _, response_id, item_id = start_response(session)
    session.receive(client({"type": "response.cancel"}))
    truncate = {"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0, "audio_end_ms": 301}
    error = single_error(session.receive(client(truncate)))
    assert error["code"] == "invalid_value"
    assert error["message"] == "Audio content of 300ms is already shorter than 301ms"


@pytest.mark.parametrize("target", ["unknown", "user"])
def test_truncate_of_an_unknown_or_user_item_is_an_error(target):
    session = new_session()
    events = speak(session, clip_pcmu("caller_question_en.wav") + silence_pcmu(700))
    item_id = "item_doesNotExist" if target == "unknown" else events[0]["item_id"]
    truncate = {"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0, "audio_end_ms": 0}
    error = single_error(session.receive(client(truncate)))
    assert error["param"] == "item_id"


def test_delete_removes_an_item_once():
    session = new_session()
    _, _, item_id = start_response(session)
    session.receive(client({"type": "response.cancel"}))
    [retrieved] = session.receive(client({"type": "conversation.item.retrieve", "item_id": item_id}))
    assert retrieved["item"]["status"] == "incomplete"
    [deleted] = session.receive(client({"type": "conversation.item.delete", "item_id": item_id}))
    validate_all([retrieved, deleted])
    assert deleted["item_id"] == item_id
    error = single_error(session.receive(client({"type": "conversation.item.delete", "item_id": item_id})))
    assert error["param"] == "item_id"


def test_a_user_text_item_is_added_after_the_last_item():
    session = new_session()
    first, second = (
        session.receive(client({"type": "conversation.item.create", "item": user_text(f"DTMF {digit}")}))
        for digit in (1, 2)
    )
    validate_all(first + second)
    assert [event["type"] for event in second] == ["conversation.item.added", "conversation.item.done"]
    assert second[0]["previous_item_id"] == first[0]["item"]["id"]
    assert second[0]["item"]["content"][0]["text"] == "DTMF 2"
    assert second[0]["item"]["id"].startswith("item_")


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("{not json", "invalid_json"),
        ("[1, 2]", "missing_required_parameter"),
        ('{"type": "response.explode"}', "invalid_value"),
        ('{"type": "conversation.item.truncate", "item_id": "i", "content_index": 0}', "missing_required_parameter"),
        ('{"type": "input_audio_buffer.append", "audio": "%%% not base64"}', "invalid_value"),
        ('{"type": "response.cancel", "response_id": 42}', "invalid_value"),
    ],
)
def test_a_bad_message_is_one_error_and_the_session_carries_on(message, code):
    session = new_session()
    events = session.receive(message)
    validate_all(events)
    error = single_error(events)
    assert error["type"] == "invalid_request_error"
    assert error["code"] == code
    assert error["message"]
    assert session.receive(client({"type": "response.create"}))[0]["type"] == "response.created"


def test_an_error_names_the_client_event_that_caused_it():
    session = new_session()
    error = single_error(session.receive(client({"type": "response.cancel", "event_id": "client_evt_7"})))
    assert error["event_id"] == "client_evt_7"


def test_default_pcm_output_is_the_clip_at_24_khz():
    session = MODEL.new_session()
    session.open()
    events = session.receive(client({"type": "response.create"})) + stream_to_end(session)
    validate_all(events)
    pcm_bytes = audio_bytes(events, events[0]["response"]["id"])
    greeting_samples = len(clip_pcmu("bot_greeting_en.wav"))
    assert abs(len(pcm_bytes) // 2 - 3 * greeting_samples) <= 3 * 160


def test_a_null_in_session_update_keeps_the_setting_and_bad_vad_values_are_refused():
    session = new_session()
    no_audio = {"type": "realtime", "instructions": "Be terse.", "audio": None}
    [updated] = session.receive(client({"type": "session.update", "session": no_audio}))
    assert updated["session"]["instructions"] == "Be terse."
    assert updated["session"]["audio"]["input"]["format"] == {"type": "audio/pcmu"}
    too_high = {"type": "realtime", "audio": {"input": {"turn_detection": {"type": "server_vad", "threshold": 1.5}}}}
    error = single_error(session.receive(client({"type": "session.update", "session": too_high})))
    assert error["param"] == "session.audio.input.turn_detection.threshold"
    assert session.turn_detection["threshold"] == 0.82
