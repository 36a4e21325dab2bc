"""The local model's input audio, sans-io: server VAD turns, commits and barge-in by speech."""

from __future__ import annotations

import base64

import numpy as np

from app.clips import load_clip
from dsp.resample import StreamingResampler
from tests.test_local_model_helpers import (
    MODEL,
    client,
    clip_pcmu,
    new_session,
    of_type,
    silence_pcmu,
    single_error,
    speak,
    start_response,
    validate_all,
)


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
