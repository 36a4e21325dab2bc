"""The local model's session logic, sans-io: client messages in, server events out, no sockets."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from app.clips import load_clip
from app.realtime.local import CLIP_TRANSCRIPTS, LocalRealtimeModel
from app.realtime.local_session import LocalSession
from dsp.resample import StreamingResampler
from tests.test_local_model_helpers import (
    appends,
    audio_bytes,
    client,
    clip_pcmu,
    of_type,
    pcmu_session_update,
    silence_pcmu,
    validate_all,
)

MODEL = LocalRealtimeModel()


def new_session(**update) -> LocalSession:
    session = MODEL.new_session()
    session.open()
    session.receive(pcmu_session_update(**update))
    return session


def speak(session: LocalSession, pcmu: bytes) -> list[dict]:
    return [event for message in appends(pcmu) for event in session.receive(message)]


def stream_to_end(session: LocalSession) -> list[dict]:
    events = []
    while session.active_response_id is not None:
        events += session.stream_step()
    return events


def start_response(session: LocalSession) -> tuple[list[dict], str, str]:
    """Create a response and stream two deltas of it; returns the events, response id and item id."""
    events = session.receive(client({"type": "response.create"}))
    events += session.stream_step() + session.stream_step()
    created = of_type(events, "response.created")[0]
    item = of_type(events, "response.output_item.added")[0]["item"]
    return events, created["response"]["id"], item["id"]


def user_text(text: str) -> dict:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def single_error(events: list[dict]) -> dict:
    assert [event["type"] for event in events] == ["error"]
    return events[0]["error"]


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


def test_session_update_can_turn_detection_off():
    session = new_session()
    update = {"type": "session.update", "session": {"type": "realtime", "audio": {"input": {"turn_detection": None}}}}
    [updated] = session.receive(client(update))
    assert updated["session"]["audio"]["input"]["turn_detection"] is None
    assert speak(session, clip_pcmu("caller_question_en.wav") + silence_pcmu(1000)) == []


def test_caller_speech_is_detected_committed_and_answered():
    session = new_session()
    events = speak(session, silence_pcmu(600) + clip_pcmu("caller_question_en.wav") + silence_pcmu(1000))
    validate_all(events)
    assert [event["type"] for event in events[:8]] == [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
        "response.created",
        "response.output_item.added",
        "conversation.item.added",
    ]
    started, stopped, committed, added = events[:4]
    assert started["item_id"] == stopped["item_id"] == committed["item_id"] == added["item"]["id"]
    assert started["item_id"].startswith("item_")
    # The clip's first loud frame is a few frames in; the reported start is 300 ms of padding before it.
    assert 600 - 300 <= started["audio_start_ms"] < 600
    # The stop comes 650 ms of silence after the last word, inside the audio fed.
    assert 600 + 3000 + 650 <= stopped["audio_end_ms"] <= 600 + 4085 + 1000
    assert committed["previous_item_id"] is None
    assert added["item"]["role"] == "user"
    assert added["item"]["content"] == [{"type": "input_audio", "transcript": None}]


def test_speech_start_is_not_padded_back_before_the_audio_began():
    session = new_session()
    [started] = speak(session, clip_pcmu("caller_question_en.wav")[:1600])
    assert started["audio_start_ms"] == 0


def test_silence_and_quiet_line_noise_are_not_speech():
    session = new_session()
    quiet = silence_pcmu(0)
    for code in (0xFF, 0x7F, 0xFE, 0x7E):
        quiet += bytes([code]) * 800
    assert speak(session, quiet * 5) == []


def test_create_response_false_only_commits():
    session = new_session(create_response=False)
    events = speak(session, clip_pcmu("caller_question_en.wav") + silence_pcmu(1000))
    assert of_type(events, "input_audio_buffer.committed")
    assert not of_type(events, "response.created")
    assert session.active_response_id is None


def test_speech_with_interrupt_response_cancels_the_active_response():
    session = new_session(interrupt_response=True)
    _, response_id, item_id = start_response(session)
    events = speak(session, clip_pcmu("caller_interrupt_en.wav")[:2400])
    validate_all(events)
    assert events[0]["type"] == "input_audio_buffer.speech_started"
    [done] = of_type(events, "response.done")
    assert done["response"]["id"] == response_id
    assert done["response"]["status"] == "cancelled"
    assert done["response"]["status_details"] == {"type": "cancelled", "reason": "turn_detected"}
    assert of_type(events, "response.output_item.done")[0]["item"]["status"] == "incomplete"
    assert session.active_response_id is None
    assert session.stream_step() == []


def test_speech_without_interrupt_response_leaves_the_response_running():
    session = new_session(interrupt_response=False)
    _, response_id, _ = start_response(session)
    events = speak(session, clip_pcmu("caller_interrupt_en.wav") + silence_pcmu(1000))
    assert of_type(events, "input_audio_buffer.committed")
    assert not of_type(events, "response.done")
    assert not of_type(events, "response.created")
    assert session.active_response_id == response_id


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


def test_manual_commit_and_clear():
    session = new_session(create_response=False)
    assert single_error(session.receive(client({"type": "input_audio_buffer.commit"})))["code"] == (
        "input_audio_buffer_commit_empty"
    )
    speak(session, silence_pcmu(200))
    committed, added, done = session.receive(client({"type": "input_audio_buffer.commit"}))
    assert committed["type"] == "input_audio_buffer.committed"
    assert added["item"]["id"] == committed["item_id"]
    speak(session, silence_pcmu(200))
    assert [event["type"] for event in session.receive(client({"type": "input_audio_buffer.clear"}))] == [
        "input_audio_buffer.cleared"
    ]
    assert single_error(session.receive(client({"type": "input_audio_buffer.commit"})))["code"] == (
        "input_audio_buffer_commit_empty"
    )


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


def test_speech_in_default_pcm_input_is_detected_through_the_resampler():
    session = MODEL.new_session()
    session.open()
    to_24_khz = StreamingResampler(8000, 24000)
    pcm = to_24_khz.process(np.concatenate((load_clip("caller_question_en.wav"), np.zeros(8000, np.int16))))
    frames = [pcm[start : start + 480] for start in range(0, len(pcm), 480)]
    events = []
    for frame in frames:
        audio = base64.b64encode(frame.astype("<i2").tobytes()).decode()
        events += session.receive(client({"type": "input_audio_buffer.append", "audio": audio}))
    validate_all(events)
    assert [event["type"] for event in events[:3]] == [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
    ]
    assert of_type(events, "response.created")[0]["response"]["audio"]["output"]["format"]["type"] == "audio/pcm"


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
