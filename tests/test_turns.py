"""The turn-taking rules, tested the h11 way: lists of events in, actions out, no sockets, no clock."""

from __future__ import annotations

import pytest

from app.realtime import protocol
from app.settings import Settings
from tests.realtime_schemas import SDK_CLIENT_EVENTS
from app.turn_events import (
    AudioDelta, AudioDone, CallEnding, CallerTranscript, CallerTurnCommitted, CallStarted, ClearCarrier, CloseCall, DtmfPressed, Log, MarkPlayed, ModelError,
    OutputItemAdded, PlayAudio, RecordEvent, RecordTranscript, ResponseCreated, ResponseDone, SendToModel, StopPlayback, Tick,
    TranscriptDone, VoiceOnset,
)
from app.turns import InboundDisposition, Turns

ONE_SECOND_OF_AUDIO = b"\x7f" * 8000


def model_events(actions, event_type=None):
    sent = [action.event for action in actions if isinstance(action, SendToModel)]
    return [event for event in sent if event_type is None or event["type"] == event_type]


def marks(actions):
    return [action.mark for action in actions if isinstance(action, PlayAudio)]


def play_all(turns, names, now):
    actions = []
    for name in names:
        actions += turns.handle(MarkPlayed(name), now)
    return actions


def greeted_call(settings=None):
    """A call whose greeting (resp_1, 1 s) was generated and fully heard; protection is over."""
    turns = Turns(settings or Settings())
    turns.handle(CallStarted(), 0.0)
    turns.handle(ResponseCreated("resp_1"), 0.1)
    greeting_marks = marks(turns.handle(AudioDelta("resp_1", "item_1", ONE_SECOND_OF_AUDIO), 0.2))
    turns.handle(AudioDone("resp_1"), 0.3)
    turns.handle(ResponseDone("resp_1", "completed"), 0.3)
    play_all(turns, greeting_marks, 1.3)
    assert turns.first_utterance_protected is False
    return turns


def answering_call(settings=None):
    """After the greeting, a 3 s answer (resp_2) is generating; returns the turns and its marks."""
    turns = greeted_call(settings)
    turns.handle(ResponseCreated("resp_2"), 5.0)
    answer_marks = marks(turns.handle(AudioDelta("resp_2", "item_2", ONE_SECOND_OF_AUDIO * 3), 5.1))
    return turns, answer_marks


def test_the_bot_speaks_first():
    actions = Turns(Settings()).handle(CallStarted(), 0.0)
    assert [event["type"] for event in model_events(actions)] == ["session.update", "response.create"]


def test_caller_talking_during_greeting_changes_nothing():
    turns = Turns(Settings())
    turns.handle(CallStarted(), 0.0)
    created = turns.handle(ResponseCreated("resp_1"), 0.1)
    assert any(isinstance(a, Log) and "NO barge-in until first response completes" in a.message for a in created)
    assert turns.first_response_id == "resp_1"
    turns.handle(AudioDelta("resp_1", "item_1", ONE_SECOND_OF_AUDIO * 3), 0.2)
    actions = turns.handle(VoiceOnset(120), 1.0)
    assert not [a for a in actions if isinstance(a, (StopPlayback, ClearCarrier, SendToModel))]
    assert turns.first_utterance_protected is True


def test_protection_ends_when_the_final_mark_comes_back_not_when_generation_ends():
    turns = Turns(Settings())
    turns.handle(CallStarted(), 0.0)
    turns.handle(ResponseCreated("resp_1"), 0.1)
    greeting_marks = marks(turns.handle(AudioDelta("resp_1", "item_1", ONE_SECOND_OF_AUDIO * 2), 0.2))
    turns.handle(AudioDone("resp_1"), 0.3)
    turns.handle(ResponseDone("resp_1", "completed"), 0.3)
    assert turns.first_utterance_protected is True
    play_all(turns, greeting_marks[:-1], 2.0)
    assert turns.first_utterance_protected is True
    released = turns.handle(MarkPlayed(greeting_marks[-1]), 2.3)
    assert turns.first_utterance_protected is False
    assert any(isinstance(a, Log) and a.message == "Barge-in now ENABLED for rest of call" for a in released)
    assert any(isinstance(a, RecordEvent) and a.kind == "first_utterance_end" for a in released)


def test_barge_in_during_the_answer_stops_playback_clears_cancels_and_truncates_in_that_order():
    turns, answer_marks = answering_call()
    play_all(turns, answer_marks[:12], 6.4)  # 1.2 s of the answer heard
    actions = turns.handle(VoiceOnset(120), 6.5)
    kinds = [type(a).__name__ if not isinstance(a, SendToModel) else a.event["type"] for a in actions
             if not isinstance(a, (Log, RecordEvent, RecordTranscript))]
    assert kinds == ["StopPlayback", "ClearCarrier", "response.cancel", "conversation.item.truncate"]
    assert model_events(actions, "response.cancel")[0]["response_id"] == "resp_2"
    truncate = model_events(actions, "conversation.item.truncate")[0]
    assert (truncate["item_id"], truncate["audio_end_ms"]) == ("item_2", 1200)
    barge_log = next(a for a in actions if isinstance(a, Log) and a.tag == "BARGE_IN")
    assert barge_log.fields["talk_over_ms"] == 120
    assert turns.bot_audible is False


def test_nothing_heard_deletes_the_item_instead_of_truncating_at_zero():
    turns, _ = answering_call()
    actions = turns.handle(VoiceOnset(120), 5.2)
    assert model_events(actions, "conversation.item.truncate") == []
    assert model_events(actions, "conversation.item.delete") == [
        {"type": "conversation.item.delete", "item_id": "item_2"}]


def test_two_onsets_give_one_cancel():
    turns, answer_marks = answering_call()
    play_all(turns, answer_marks[:3], 5.5)
    first = turns.handle(VoiceOnset(120), 5.6)
    second = turns.handle(VoiceOnset(120), 6.0)
    assert len(model_events(first + second, "response.cancel")) == 1
    assert second == []


def test_response_done_racing_our_cancel_gives_no_second_cancel_and_no_error():
    turns, answer_marks = answering_call()
    play_all(turns, answer_marks[:3], 5.5)
    barge = turns.handle(VoiceOnset(120), 5.6)
    assert len(model_events(barge, "response.cancel")) == 1
    done = turns.handle(ResponseDone("resp_2", "cancelled"), 5.61)
    raced = turns.handle(ModelError("response_cancel_not_active", "no active response", ""), 5.62)
    assert model_events(done + raced) == []
    assert [a.level for a in raced if isinstance(a, Log)] == ["info"]
    assert not [a for a in raced if isinstance(a, RecordEvent)]


def test_no_cancel_when_the_model_already_finished_the_response():
    turns, answer_marks = answering_call()
    turns.handle(AudioDone("resp_2"), 5.2)
    turns.handle(ResponseDone("resp_2", "completed"), 5.2)
    play_all(turns, answer_marks[:5], 5.8)
    actions = turns.handle(VoiceOnset(120), 5.9)
    assert model_events(actions, "response.cancel") == []
    assert [a for a in actions if isinstance(a, ClearCarrier)]


def test_barge_in_works_when_generation_finished_but_audio_is_still_playing():
    turns, answer_marks = answering_call()
    turns.handle(AudioDone("resp_2"), 5.2)
    turns.handle(ResponseDone("resp_2", "completed"), 5.2)
    assert turns.bot_audible is True
    play_all(turns, answer_marks[:10], 6.2)
    actions = turns.handle(VoiceOnset(120), 6.3)
    assert [a for a in actions if isinstance(a, StopPlayback)] == [StopPlayback("resp_2")]
    assert model_events(actions, "conversation.item.truncate")[0]["audio_end_ms"] == 1000


def test_late_deltas_after_a_cancel_are_dropped():
    turns, _ = answering_call()
    turns.handle(VoiceOnset(120), 5.2)
    assert turns.handle(AudioDelta("resp_2", "item_2", ONE_SECOND_OF_AUDIO), 5.3) == []


def test_marks_echoed_after_clear_mean_flushed_not_played():
    turns, answer_marks = answering_call()
    play_all(turns, answer_marks[:4], 5.5)
    turns.handle(VoiceOnset(120), 5.6)
    play_all(turns, answer_marks[4:], 5.61)  # Twilio returns the pending marks at once on clear
    actions = turns.handle(TranscriptDone("resp_2", "item_2", "a long answer"), 5.7)
    actions += turns.handle(CallEnding("carrier_stop"), 6.0)
    transcripts = [a for a in actions if isinstance(a, RecordTranscript)]
    assert transcripts == [RecordTranscript("assistant", "a long answer", 5.1, True, 400)]


def test_an_item_heard_to_its_end_is_neither_truncated_nor_deleted():
    turns = greeted_call()
    turns.handle(ResponseCreated("resp_2"), 5.0)
    heard_marks = marks(turns.handle(AudioDelta("resp_2", "item_2", b"\xff" * 1000), 5.1))  # 125 ms
    play_all(turns, heard_marks, 5.3)
    turns.handle(ResponseCreated("resp_2"), 5.3)  # a duplicate must not reset what was heard
    actions = turns.handle(VoiceOnset(120), 5.35)
    assert model_events(actions, "conversation.item.truncate") == []
    assert model_events(actions, "conversation.item.delete") == []
    assert model_events(actions, "response.cancel") == [{"type": "response.cancel", "response_id": "resp_2"}]


def test_a_resend_of_the_first_response_moves_the_protection():
    turns = Turns(Settings())
    turns.handle(CallStarted(), 0.0)
    turns.handle(ResponseCreated("resp_1"), 0.1)
    retry = turns.handle(ResponseDone("resp_1", "failed"), 0.5)
    assert [event["type"] for event in model_events(retry)] == ["response.create"]
    assert turns.first_utterance_protected is True
    turns.handle(ResponseCreated("resp_2"), 0.6)
    assert turns.first_response_id == "resp_2"
    resent_marks = marks(turns.handle(AudioDelta("resp_2", "item_2", ONE_SECOND_OF_AUDIO), 0.7))
    turns.handle(AudioDone("resp_2"), 0.8)
    turns.handle(ResponseDone("resp_2", "completed"), 0.8)
    assert turns.handle(VoiceOnset(120), 1.0)[0].tag == "FIRST_UTTERANCE"
    play_all(turns, resent_marks, 1.8)
    assert turns.first_utterance_protected is False


def test_an_error_for_the_first_response_request_sends_it_again():
    turns = Turns(Settings())
    request = model_events(turns.handle(CallStarted(), 0.0), "response.create")[0]
    retry = turns.handle(ModelError("server_error", "try again", request["event_id"]), 0.2)
    assert len(model_events(retry, "response.create")) == 1


def test_an_error_event_does_not_clear_a_newer_responses_id():
    turns, answer_marks = answering_call()
    turns.handle(ModelError("conversation_already_has_active_response", "busy", "evt_other"), 5.2)
    play_all(turns, answer_marks[:2], 5.4)
    actions = turns.handle(VoiceOnset(120), 5.5)
    assert model_events(actions, "response.cancel") == [{"type": "response.cancel", "response_id": "resp_2"}]


def test_a_silent_greeting_releases_the_protection():
    turns = Turns(Settings())
    turns.handle(CallStarted(), 0.0)
    turns.handle(ResponseCreated("resp_1"), 0.1)
    actions = turns.handle(ResponseDone("resp_1", "completed"), 0.4)
    assert turns.first_utterance_protected is False
    assert any(isinstance(a, Log) and a.fields.get("why") == "first response produced no audio" for a in actions)


def test_safety_net_ends_protection_when_the_final_mark_never_comes_back():
    turns = Turns(Settings())
    turns.handle(CallStarted(), 0.0)
    turns.handle(ResponseCreated("resp_1"), 0.1)
    turns.handle(AudioDelta("resp_1", "item_1", ONE_SECOND_OF_AUDIO * 2), 0.2)
    turns.handle(AudioDone("resp_1"), 0.5)
    turns.handle(Tick(), 4.4)  # 2 s buffered + 2 s margin is not over yet
    assert turns.first_utterance_protected is True
    actions = turns.handle(Tick(), 4.5)
    assert turns.first_utterance_protected is False
    assert "final mark not back" in next(a for a in actions if isinstance(a, Log)).fields["why"]


def test_a_model_that_never_answers_does_not_lock_the_call():
    turns = Turns(Settings(first_response_max_retries=0))
    turns.handle(CallStarted(), 0.0)
    turns.handle(Tick(), 9.9)
    assert turns.first_utterance_protected is True
    turns.handle(Tick(), 10.0)
    assert turns.first_utterance_protected is False


@pytest.mark.parametrize("mode, expected", [
    ("silence", InboundDisposition.SILENCE), ("drop", InboundDisposition.DROP), ("pass", InboundDisposition.AUDIO)])
def test_greeting_lock_modes(mode, expected):
    turns = Turns(Settings(greeting_lock_mode=mode))
    turns.handle(CallStarted(), 0.0)
    assert turns.inbound_disposition(caller_audio=True) is expected


def test_while_the_bot_is_audible_the_model_hears_only_what_the_inbound_path_takes_for_the_caller():
    turns, _ = answering_call()
    assert turns.inbound_disposition(caller_audio=False) is InboundDisposition.SILENCE
    assert turns.inbound_disposition(caller_audio=True) is InboundDisposition.AUDIO
    quiet = greeted_call()
    assert quiet.inbound_disposition(caller_audio=False) is InboundDisposition.AUDIO


@pytest.mark.parametrize("settings, per_call", [(Settings(enable_barge_in=False), True), (Settings(), False)])
def test_barge_in_switched_off_never_cancels(settings, per_call):
    turns = Turns(settings, barge_in_enabled=per_call)
    turns.handle(CallStarted(), 0.0)
    turns.handle(ResponseCreated("resp_1"), 0.1)
    turns.handle(ResponseDone("resp_1", "completed"), 0.2)
    turns.handle(ResponseCreated("resp_2"), 1.0)
    turns.handle(AudioDelta("resp_2", "item_2", ONE_SECOND_OF_AUDIO), 1.1)
    assert turns.handle(VoiceOnset(120), 1.2) == []


def test_dtmf_is_logged_and_sent_as_a_user_text_item():
    turns = greeted_call()
    actions = turns.handle(DtmfPressed("5"), 3.0)
    item = model_events(actions, "conversation.item.create")[0]["item"]
    assert item["role"] == "user" and "5" in item["content"][0]["text"]
    assert any(isinstance(a, Log) and a.tag == "DTMF" for a in actions)


def test_every_event_sent_validates_against_the_openai_types():
    turns, answer_marks = answering_call()
    actions = turns.handle(DtmfPressed("1"), 5.15)
    play_all(turns, answer_marks[:2], 5.3)
    actions += turns.handle(VoiceOnset(120), 5.4)
    fresh = Turns(Settings())
    actions += fresh.handle(CallStarted(), 0.0)
    actions += greeted_call().handle(CloseCall("max_duration"), 20.0)  # the closing line's own instructions
    sent = model_events(actions)
    assert any("response" in event for event in sent)
    assert {event["type"] for event in sent} >= {
        "session.update", "response.create", "response.cancel", "conversation.item.truncate",
        "conversation.item.create"}
    for event in sent:
        SDK_CLIENT_EVENTS.validate_python(event)


def test_a_barge_in_before_any_audio_deletes_the_item_and_records_nothing():
    turns = greeted_call()
    turns.handle(ResponseCreated("resp_2"), 5.0)
    turns.handle(OutputItemAdded("resp_2", "item_2"), 5.0)
    actions = turns.handle(VoiceOnset(120), 5.1)
    assert model_events(actions, "conversation.item.delete") == [
        {"type": "conversation.item.delete", "item_id": "item_2"}]
    late = turns.handle(OutputItemAdded("resp_2", "item_3"), 5.15)
    late += turns.handle(TranscriptDone("resp_2", "item_2", "never heard"), 5.2)
    late += turns.handle(ResponseDone("resp_2", "cancelled"), 5.3)
    late += turns.handle(CallEnding("carrier_stop"), 6.0)
    assert model_events(late, "conversation.item.delete") == [
        {"type": "conversation.item.delete", "item_id": "item_3"}]
    assert not [a for a in late if isinstance(a, RecordTranscript)]


def test_a_stale_error_for_an_earlier_first_response_request_changes_nothing():
    turns = Turns(Settings())
    first_request = model_events(turns.handle(CallStarted(), 0.0), "response.create")[0]
    turns.handle(ModelError("server_error", "failed", first_request["event_id"]), 0.1)
    turns.handle(ResponseCreated("resp_2"), 0.2)
    stale = turns.handle(ModelError("server_error", "failed again", first_request["event_id"]), 0.3)
    assert model_events(stale) == []
    assert turns.first_response_id == "resp_2" and turns.first_utterance_protected is True


def test_the_first_item_done_is_not_the_first_response_done():
    turns = Turns(Settings())
    turns.handle(CallStarted(), 0.0)
    turns.handle(ResponseCreated("resp_1"), 0.1)
    first_item_marks = marks(turns.handle(AudioDelta("resp_1", "item_a", ONE_SECOND_OF_AUDIO), 0.2))
    turns.handle(AudioDone("resp_1"), 0.3)
    play_all(turns, first_item_marks, 1.2)
    assert turns.first_utterance_protected is True  # a second item may follow
    second_item_marks = marks(turns.handle(AudioDelta("resp_1", "item_b", ONE_SECOND_OF_AUDIO), 1.3))
    turns.handle(ResponseDone("resp_1", "completed"), 1.4)
    play_all(turns, second_item_marks, 2.3)
    assert turns.first_utterance_protected is False


def test_a_first_response_that_stalls_after_created_does_not_lock_the_call():
    turns = Turns(Settings())
    turns.handle(CallStarted(), 0.0)
    turns.handle(ResponseCreated("resp_1"), 1.0)
    turns.handle(Tick(), 10.9)
    assert turns.first_utterance_protected is True
    actions = turns.handle(Tick(), 11.0)
    assert turns.first_utterance_protected is False
    assert next(a for a in actions if isinstance(a, Log)).fields["why"] == "first response stalled"


def test_an_onset_on_the_frame_the_safety_net_expires_barges_in():
    turns = Turns(Settings())
    turns.handle(CallStarted(), 0.0)
    turns.handle(ResponseCreated("resp_1"), 0.1)
    turns.handle(AudioDelta("resp_1", "item_1", ONE_SECOND_OF_AUDIO * 5), 0.2)
    turns.handle(ResponseDone("resp_1", "completed"), 0.5)  # deadline: 5 s unplayed + 2 s
    actions = turns.handle(VoiceOnset(120), 7.5)
    assert turns.first_utterance_protected is False
    assert [a for a in actions if isinstance(a, ClearCarrier)]


def test_talk_over_is_the_voiced_run_that_overlapped_the_bots_sound():
    turns = greeted_call()
    turns.handle(ResponseCreated("resp_2"), 5.0)
    turns.handle(AudioDelta("resp_2", "item_2", ONE_SECOND_OF_AUDIO), 5.0)
    just_started = turns.handle(VoiceOnset(120), 5.05)
    assert next(a for a in just_started if isinstance(a, Log) and a.tag == "BARGE_IN").fields["talk_over_ms"] == 50


@pytest.mark.parametrize("answering, creates", [(False, True), (True, False)])
def test_a_key_press_gets_an_answer_unless_one_is_on_its_way(answering, creates):
    turns = answering_call()[0] if answering else greeted_call()
    actions = turns.handle(DtmfPressed("3"), 6.0)
    assert bool(model_events(actions, "response.create")) is creates


def test_the_callers_transcribed_turn_is_recorded_from_when_it_was_committed():
    turns = greeted_call()
    assert turns.handle(CallerTurnCommitted("item_c1"), 4.0) == []
    turns.handle(CallerTurnCommitted("item_c2"), 6.0)
    assert turns.handle(CallerTranscript("item_c2", "and on Sundays?"), 6.9) == [
        RecordTranscript("user", "and on Sundays?", 6.0, False, None)]
    assert turns.handle(CallerTranscript("item_c1", "  "), 7.0) == []  # nothing said: nothing recorded
    # A transcript whose commit we never saw is dated when it came.
    assert turns.handle(CallerTranscript("item_c9", "hello?"), 8.0) == [
        RecordTranscript("user", "hello?", 8.0, False, None)]


def test_the_session_asks_for_the_callers_words_only_when_a_transcription_model_is_set():
    def transcription(settings):
        return protocol.session_update(settings)["session"]["audio"]["input"].get("transcription")
    assert transcription(Settings()) == {"model": "gpt-4o-mini-transcribe"}
    assert transcription(Settings(input_transcription_model="")) is None
    SDK_CLIENT_EVENTS.validate_python(protocol.session_update(Settings()))
