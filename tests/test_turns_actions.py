"""Every action of each turn-taking rule, in order and in full: what the model, the phone, the log and the
call record get. The scenario tests in test_turns.py check the behaviour; these pin down its exact output."""

from __future__ import annotations

import json

import pytest

from app.realtime import protocol
from app.settings import Settings
from app.turn_events import (
    AudioDelta, AudioDone, CallEnding, CallStarted, ClearCarrier, DtmfPressed, Log, MarkPlayed, ModelError,
    OutputItemAdded, PlayAudio, RecordEvent, RecordTranscript, ResponseCreated, ResponseDone, SendToModel, StopPlayback, Tick,
    TranscriptDone, VoiceOnset,
)
from app.turns import Turns
from tests.test_turns import ONE_SECOND_OF_AUDIO, answering_call, greeted_call, marks, play_all

SETTINGS = Settings()


def first_request(attempt: int) -> SendToModel:
    return SendToModel({**protocol.response_create(), "event_id": f"callgate_first_response_{attempt}"})


def resent(reason: str, attempt: int) -> list:
    return [Log("FIRST_UTTERANCE", "first response failed, sending it again", {"reason": reason, "attempt": attempt},
                level="warning"), first_request(attempt)]


def released(response_id: str | None, why: str) -> list:
    return [Log("FIRST_UTTERANCE", "Barge-in now ENABLED for rest of call", {"resp": response_id, "why": why}),
            RecordEvent("first_utterance_end", {"response_id": response_id, "why": why})]


def test_the_call_starts_with_the_session_and_the_first_request():
    assert Turns(SETTINGS).handle(CallStarted(), 0.0) == [
        SendToModel(protocol.session_update(SETTINGS)), first_request(1)]


def test_an_unanswered_first_request_is_sent_again_up_to_the_retries_then_the_call_is_released():
    turns = Turns(SETTINGS)  # two retries
    turns.handle(CallStarted(), 0.0)
    assert turns.handle(Tick(), 9.99) == []
    assert turns.handle(Tick(), 10.0) == resent("no response.created in time", 2)
    assert turns.handle(Tick(), 19.99) == []
    assert turns.handle(Tick(), 20.0) == resent("no response.created in time", 3)
    assert turns.first_utterance_protected is True
    assert turns.handle(Tick(), 30.0) == released(None, "first response failed 3 times: no response.created in time")
    assert turns.handle(Tick(), 40.0) == []


def test_a_first_response_stalls_only_once_no_audio_came_for_the_timeout():
    turns = Turns(SETTINGS)
    turns.handle(CallStarted(), 0.0)
    assert turns.handle(ResponseCreated("resp_1"), 1.0) == [
        Log("FIRST_UTTERANCE", "NO barge-in until first response completes", {"resp": "resp_1"})]
    turns.handle(AudioDelta("resp_1", "item_1", ONE_SECOND_OF_AUDIO), 9.0)  # each chunk pushes the deadline back
    assert turns.handle(Tick(), 18.99) == []
    assert turns.handle(Tick(), 19.0) == released("resp_1", "first response stalled")


def test_a_failed_first_response_is_requested_again():
    turns = Turns(SETTINGS)
    turns.handle(CallStarted(), 0.0)
    turns.handle(ResponseCreated("resp_1"), 0.1)
    assert turns.handle(ResponseDone("resp_1", "failed"), 0.5) == resent("status=failed", 2)
    assert turns.handle(Tick(), 10.49) == []
    assert turns.handle(Tick(), 10.5) == resent("no response.created in time", 3)


def test_an_error_answering_the_first_request_is_recorded_and_the_request_sent_again():
    turns = Turns(SETTINGS)
    turns.handle(CallStarted(), 0.0)
    fields = {"code": "server_error", "event_id": "callgate_first_response_1"}
    assert turns.handle(ModelError("server_error", "try again", "callgate_first_response_1"), 0.2) == [
        Log("MODEL_ERROR", "try again", fields, "error"),
        RecordEvent("error", {"code": "server_error", "message": "try again"}),
        *resent("error server_error", 2),
    ]


def test_an_error_answering_another_request_is_recorded_and_does_not_resend_the_first():
    turns = Turns(SETTINGS)
    turns.handle(CallStarted(), 0.0)
    assert turns.handle(ModelError("invalid_value", "bad field", "evt_other"), 0.2) == [
        Log("MODEL_ERROR", "bad field", {"code": "invalid_value", "event_id": "evt_other"}, "error"),
        RecordEvent("error", {"code": "invalid_value", "message": "bad field"}),
    ]


def test_cancel_not_active_with_no_cancel_of_ours_is_an_error():
    turns = greeted_call()
    assert turns.handle(ModelError("response_cancel_not_active", "no active response", "evt_1"), 3.0) == [
        Log("MODEL_ERROR", "no active response", {"code": "response_cancel_not_active", "event_id": "evt_1"}, "error"),
        RecordEvent("error", {"code": "response_cancel_not_active", "message": "no active response"}),
    ]


def test_cancel_not_active_after_our_cancel_is_only_noted():
    turns, _ = answering_call()
    turns.handle(VoiceOnset(120), 5.2)
    assert turns.handle(ModelError("response_cancel_not_active", "no active response", "evt_2"), 5.3) == [
        Log("MODEL_ERROR", "our cancel crossed the response's end; nothing to do",
            {"code": "response_cancel_not_active", "event_id": "evt_2"})]


def test_the_safety_net_waits_for_the_unplayed_audio_not_all_of_it():
    turns = Turns(SETTINGS)
    turns.handle(CallStarted(), 0.0)
    turns.handle(ResponseCreated("resp_1"), 0.1)
    greeting_marks = marks(turns.handle(AudioDelta("resp_1", "item_1", ONE_SECOND_OF_AUDIO * 2), 0.2))
    play_all(turns, greeting_marks[:10], 1.2)
    turns.handle(AudioDone("resp_1"), 1.5)  # 1 s unplayed + 2 s margin: until 4.5
    assert turns.handle(Tick(), 4.499) == []
    assert turns.handle(Tick(), 4.5) == released(
        "resp_1", "final mark not back within buffered audio plus safety margin")


def test_the_greeting_heard_to_its_end_releases_the_call_once():
    turns = Turns(SETTINGS)
    turns.handle(CallStarted(), 0.0)
    turns.handle(ResponseCreated("resp_1"), 0.1)
    greeting_marks = marks(turns.handle(AudioDelta("resp_1", "item_1", ONE_SECOND_OF_AUDIO), 0.2))
    turns.handle(AudioDone("resp_1"), 0.3)
    assert turns.handle(ResponseDone("resp_1", "completed"), 0.3) == []
    assert turns.handle(VoiceOnset(120), 0.5) == [
        Log("FIRST_UTTERANCE", "caller speech ignored while the first utterance plays", {"resp": "resp_1"})]
    assert play_all(turns, greeting_marks[:-1], 1.1) == []
    assert turns.handle(MarkPlayed(greeting_marks[-1]), 1.2) == released("resp_1", "first response fully played")
    assert turns.handle(Tick(), 30.0) == []


def test_audio_goes_out_in_chunks_each_with_its_own_mark():
    turns = greeted_call()
    turns.handle(ResponseCreated("resp_2"), 5.0)
    audio = bytes(range(256)) * 7  # 1792 bytes: two 100 ms chunks and a 24 ms tail
    assert turns.handle(AudioDelta("resp_2", "item_2", audio), 5.1) == [
        PlayAudio("resp_2", audio[:800], "resp_2:11"), PlayAudio("resp_2", audio[800:1600], "resp_2:12"),
        PlayAudio("resp_2", audio[1600:], "resp_2:13")]


def test_barge_in_over_two_audible_responses_silences_both_and_cancels_the_live_one():
    turns = greeted_call()
    turns.handle(ResponseCreated("resp_2"), 5.0)
    answer_marks = marks(turns.handle(AudioDelta("resp_2", "item_2", ONE_SECOND_OF_AUDIO), 5.1))
    turns.handle(AudioDone("resp_2"), 5.2)
    turns.handle(ResponseDone("resp_2", "completed"), 5.2)
    turns.handle(ResponseCreated("resp_3"), 5.3)
    turns.handle(AudioDelta("resp_3", "item_3", ONE_SECOND_OF_AUDIO), 5.3)
    play_all(turns, answer_marks[:4], 5.5)

    actions = turns.handle(VoiceOnset(800), 5.8)  # the bot has sounded since 5.1

    assert actions == [
        StopPlayback("resp_2"), StopPlayback("resp_3"), ClearCarrier(),
        SendToModel(protocol.item_truncate("item_2", 400)),
        SendToModel(protocol.response_cancel("resp_3")), SendToModel(protocol.item_delete("item_3")),
        Log("BARGE_IN", "caller talked over the bot, bot silenced",
            {"resp": "resp_2,resp_3", "talk_over_ms": 700, "heard_ms": 400}),
        RecordEvent("barge_in", {"talk_over_ms": 700, "heard_ms": {"item_2": 400, "item_3": 0}}),
    ]
    assert json.dumps(actions[3].event).endswith('"audio_end_ms": 400}')  # an integer, as the API requires
    assert turns.bot_audible is False
    assert turns.handle(TranscriptDone("resp_2", "item_2", "Our opening hours are"), 5.7) == [
        RecordTranscript("assistant", "Our opening hours are", 5.1, True, 400)]
    assert turns.handle(VoiceOnset(120), 5.8) == []


def test_a_key_press_is_logged_recorded_told_to_the_model_and_answered():
    turns = greeted_call()
    assert turns.handle(DtmfPressed("5"), 3.0) == [
        Log("DTMF", "caller pressed a key", {"digit": "5"}),
        RecordEvent("dtmf", {"digit": "5"}),
        SendToModel(protocol.user_text_item("The caller pressed the phone key 5.")),
        SendToModel(protocol.response_create()),
    ]


def test_a_call_ending_mid_answer_records_what_was_heard():
    turns, answer_marks = answering_call()
    turns.handle(TranscriptDone("resp_2", "item_2", "Our opening hours are nine to five"), 5.2)
    play_all(turns, answer_marks[:7], 5.8)
    assert turns.handle(CallEnding("carrier_stop"), 5.9) == [
        Log("CALL", "call ending", {"reason": "carrier_stop"}),
        RecordTranscript("assistant", "Our opening hours are nine to five", 5.1, True, 700),
    ]


def test_an_answer_heard_in_full_is_recorded_once_when_its_last_mark_returns():
    turns, answer_marks = answering_call()
    turns.handle(AudioDone("resp_2"), 5.2)
    assert play_all(turns, answer_marks[:5], 5.6) == []
    turns.handle(TranscriptDone("resp_2", "item_2", "Nine to five"), 5.6)
    assert turns.handle(ResponseDone("resp_2", "completed"), 5.7) == []  # the caller is still hearing it
    assert play_all(turns, answer_marks[5:-1], 8.0) == []
    assert turns.handle(MarkPlayed(answer_marks[-1]), 8.1) == [
        RecordTranscript("assistant", "Nine to five", 5.1, False, 3000)]
    assert turns.handle(CallEnding("carrier_stop"), 9.0) == [Log("CALL", "call ending", {"reason": "carrier_stop"})]


def test_a_done_for_a_response_never_created_is_a_warning():
    assert greeted_call().handle(ResponseDone("resp_9", "completed"), 3.0) == [
        Log("MODEL", "response.done for an unknown response", {"resp": "resp_9"}, "warning")]


def test_an_item_starts_when_the_model_announces_it_or_when_its_transcript_comes_first():
    turns = greeted_call()
    turns.handle(ResponseCreated("resp_2"), 5.0)
    turns.handle(OutputItemAdded("resp_2", "item_2"), 5.05)
    turns.handle(TranscriptDone("resp_2", "item_3", "And on Sundays"), 5.2)
    item_2_marks = marks(turns.handle(AudioDelta("resp_2", "item_2", ONE_SECOND_OF_AUDIO), 5.3))
    turns.handle(TranscriptDone("resp_2", "item_2", "We open at nine"), 5.3)
    item_3_marks = marks(turns.handle(AudioDelta("resp_2", "item_3", ONE_SECOND_OF_AUDIO), 5.4))
    turns.handle(ResponseDone("resp_2", "completed"), 5.5)
    recorded = play_all(turns, item_2_marks + item_3_marks, 7.5)
    assert recorded == [RecordTranscript("assistant", "We open at nine", 5.05, False, 1000),
                        RecordTranscript("assistant", "And on Sundays", 5.2, False, 1000)]


def test_a_text_only_item_nobody_heard_is_not_recorded():
    turns = greeted_call()
    turns.handle(ResponseCreated("resp_2"), 5.0)
    turns.handle(TranscriptDone("resp_2", "item_2", "never spoken"), 5.1)
    assert turns.handle(ResponseDone("resp_2", "completed"), 5.2) == []
    assert turns.handle(CallEnding("carrier_stop"), 6.0) == [Log("CALL", "call ending", {"reason": "carrier_stop"})]


def test_items_the_model_adds_after_a_barge_in_are_deleted_once():
    turns = greeted_call()
    turns.handle(ResponseCreated("resp_2"), 5.0)
    turns.handle(VoiceOnset(120), 5.1)
    turns.handle(OutputItemAdded("resp_2", "item_3"), 5.15)
    assert turns.handle(ResponseDone("resp_2", "cancelled"), 5.3) == [SendToModel(protocol.item_delete("item_3"))]
    assert turns.handle(TranscriptDone("resp_2", "item_3", "late"), 5.4) == []


def test_a_barge_in_before_the_bot_ever_made_a_sound_talked_over_nothing():
    turns = Turns(SETTINGS)
    turns.handle(CallStarted(), 0.0)
    turns.handle(ResponseCreated("resp_1"), 0.1)
    turns.handle(ResponseDone("resp_1", "completed"), 0.2)  # a silent greeting
    turns.handle(ResponseCreated("resp_2"), 1.0)
    assert turns.handle(VoiceOnset(300), 1.5) == [
        StopPlayback("resp_2"), ClearCarrier(), SendToModel(protocol.response_cancel("resp_2")),
        Log("BARGE_IN", "caller talked over the bot, bot silenced", {"resp": "resp_2", "talk_over_ms": 0, "heard_ms": 0}),
        RecordEvent("barge_in", {"talk_over_ms": 0, "heard_ms": {}}),
    ]


def test_a_key_pressed_during_the_greeting_is_answered_and_the_greeting_stays_protected_until_heard():
    turns = Turns(SETTINGS)
    turns.handle(CallStarted(), 0.0)
    turns.handle(ResponseCreated("resp_1"), 0.1)
    turns.handle(AudioDelta("resp_1", "item_1", ONE_SECOND_OF_AUDIO), 0.2)
    turns.handle(ResponseDone("resp_1", "completed"), 0.3)  # safety net: 1 s unplayed + 2 s, until 3.3
    assert model_events_of(turns.handle(DtmfPressed("1"), 0.5)) == [
        protocol.user_text_item("The caller pressed the phone key 1."), protocol.response_create()]
    assert turns.handle(ResponseCreated("resp_2"), 0.6) == []
    turns.handle(AudioDelta("resp_2", "item_2", ONE_SECOND_OF_AUDIO), 0.7)
    turns.handle(ResponseDone("resp_2", "completed"), 0.8)
    assert turns.first_response_id == "resp_1"
    assert turns.handle(VoiceOnset(120), 1.0) == [
        Log("FIRST_UTTERANCE", "caller speech ignored while the first utterance plays", {"resp": "resp_1"})]
    assert turns.handle(Tick(), 3.29) == []
    assert turns.handle(Tick(), 3.3) == released(
        "resp_1", "final mark not back within buffered audio plus safety margin")


def test_an_unknown_event_is_a_type_error_that_names_it():
    with pytest.raises(TypeError) as raised:
        Turns(SETTINGS).handle("hello", 0.0)
    assert str(raised.value) == "unknown turn event 'hello'"


def model_events_of(actions) -> list[dict]:
    return [action.event for action in actions if isinstance(action, SendToModel)]


def test_an_item_heard_for_a_single_millisecond_is_recorded_as_heard():
    turns = greeted_call()
    turns.handle(ResponseCreated("resp_2"), 5.0)
    heard = marks(turns.handle(AudioDelta("resp_2", "item_2", b"\xff" * 8), 5.1))
    turns.handle(TranscriptDone("resp_2", "item_2", "Yes"), 5.1)
    turns.handle(ResponseDone("resp_2", "completed"), 5.1)
    assert turns.handle(MarkPlayed(heard[0]), 5.2) == [RecordTranscript("assistant", "Yes", 5.1, False, 1)]


def test_a_call_ending_records_an_item_heard_for_a_single_millisecond():
    turns = greeted_call()
    turns.handle(ResponseCreated("resp_2"), 5.0)
    heard = marks(turns.handle(AudioDelta("resp_2", "item_2", b"\xff" * 8), 5.1))
    turns.handle(TranscriptDone("resp_2", "item_2", "Yes"), 5.1)
    turns.handle(MarkPlayed(heard[0]), 5.2)  # the response is still generating: nothing is settled yet
    assert turns.handle(CallEnding("carrier_stop"), 5.3) == [
        Log("CALL", "call ending", {"reason": "carrier_stop"}), RecordTranscript("assistant", "Yes", 5.1, False, 1)]
