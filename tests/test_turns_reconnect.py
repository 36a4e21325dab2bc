"""A model link lost and reopened: the new session is told the call as the caller heard it, then goes on."""

from __future__ import annotations

from app.realtime import protocol
from app.settings import Settings
from app.turn_events import (
    AudioDelta, CallerTranscript, CallerTurnCommitted, CallStarted, ClearCarrier, CloseCall, DtmfPressed, HangUp, Log,
    ModelReconnected, RecordEvent, RecordTranscript, ResponseCreated, ResponseDone, SendToModel, StopPlayback, Tick,
    TranscriptDone, VoiceOnset,
)
from app.turns import Turns, heard_text
from tests.test_turns import ONE_SECOND_OF_AUDIO, greeted_call, marks, model_events, play_all

SETTINGS = Settings()
SESSION = SendToModel(protocol.session_update(SETTINGS))


def reopened(turns_restored: int) -> list:
    return [Log("MODEL", "model session reopened; the call so far restored", {"turns": turns_restored}, "warning"),
            RecordEvent("model_reconnected", {"turns_restored": turns_restored}), SESSION]


def said(role: str, text: str) -> SendToModel:
    return SendToModel(protocol.user_text_item(text) if role == "user" else protocol.assistant_text_item(text))


def test_heard_text_keeps_the_words_heard_spread_evenly_over_the_audio():
    assert heard_text("one two three four", 500, 1000) == "one two"
    assert heard_text("one two three four", 1000, 1000) == "one two three four"
    assert heard_text("one two three four", 1200, 1000) == "one two three four"
    assert heard_text("one two three four", 0, 1000) == ""
    assert heard_text("one two three four", 0, 0) == "one two three four"


def greeted_with_transcript() -> Turns:
    """The greeting (resp_1) said and heard to the end, with its transcript."""
    turns = Turns(SETTINGS)
    turns.handle(CallStarted(), 0.0)
    turns.handle(ResponseCreated("resp_1"), 0.1)
    greeting_marks = marks(turns.handle(AudioDelta("resp_1", "item_1", ONE_SECOND_OF_AUDIO), 0.2))
    turns.handle(TranscriptDone("resp_1", "item_1", "Hello, how can I help?"), 0.3)
    turns.handle(ResponseDone("resp_1", "completed"), 0.3)
    play_all(turns, greeting_marks, 1.3)
    assert not turns.first_utterance_protected
    return turns


def test_an_answer_cut_by_the_drop_is_remembered_as_heard_and_asked_to_go_on():
    turns = greeted_with_transcript()
    turns.handle(CallerTurnCommitted("item_c1"), 2.0)
    turns.handle(CallerTranscript("item_c1", "When do you open on Sunday?"), 2.2)
    turns.handle(DtmfPressed("5"), 2.4)
    turns.handle(ResponseCreated("resp_2"), 3.0)
    answer_marks = marks(turns.handle(AudioDelta("resp_2", "item_2", ONE_SECOND_OF_AUDIO * 2), 3.1))
    turns.handle(TranscriptDone("resp_2", "item_2", "On Sundays we open at ten"), 3.2)
    play_all(turns, answer_marks[:10], 4.1)  # one of its two seconds heard, then the link drops
    actions = turns.handle(ModelReconnected(), 4.5)
    assert actions == [
        RecordTranscript("assistant", "On Sundays we open at ten", 3.1, True, 1000),
        StopPlayback("resp_2"), ClearCarrier(),  # the unheard second is gone with the lost session
        *reopened(4),
        said("assistant", "Hello, how can I help?"), said("user", "When do you open on Sunday?"),
        said("user", "The caller pressed the phone key 5."), said("assistant", "On Sundays we"),
        SendToModel(protocol.response_create()),
    ]
    assert not turns.bot_audible
    # The lost session's response is never cancelled, truncated or deleted: the new session never had it.
    assert turns.handle(ResponseDone("resp_2", "completed"), 4.6) == [
        Log("MODEL", "response.done for an unknown response", {"resp": "resp_2"}, "warning")]


def test_a_quiet_call_is_only_restored():
    turns = greeted_with_transcript()
    assert turns.handle(ModelReconnected(), 5.0) == [*reopened(1), said("assistant", "Hello, how can I help?")]


def test_a_reply_owed_at_the_drop_is_asked_of_the_new_session_and_watched():
    turns = greeted_call()
    turns.handle(CallerTurnCommitted("item_c1"), 5.0)
    actions = turns.handle(ModelReconnected(), 5.5)
    assert model_events(actions, "response.create") == [protocol.response_create()]
    timeout_s = SETTINGS.model_reply_timeout_s
    assert turns.handle(Tick(), 5.5 + timeout_s - 0.05) == []
    assert SendToModel(protocol.response_create()) in turns.handle(Tick(), 5.5 + timeout_s)


def test_a_greeting_cut_by_the_drop_is_asked_again_and_stays_protected():
    turns = Turns(SETTINGS)
    turns.handle(CallStarted(), 0.0)
    turns.handle(ResponseCreated("resp_1"), 0.1)
    greeting_marks = marks(turns.handle(AudioDelta("resp_1", "item_1", ONE_SECOND_OF_AUDIO * 3), 0.2))
    turns.handle(TranscriptDone("resp_1", "item_1", "Hello and welcome to the shop"), 0.3)
    play_all(turns, greeting_marks[:10], 1.2)
    actions = turns.handle(ModelReconnected(), 1.5)
    assert model_events(actions, "conversation.item.create") == [protocol.assistant_text_item("Hello and")]
    assert model_events(actions, "response.create") == [{**protocol.response_create(),
                                                          "event_id": "callgate_first_response_2"}]
    turns.handle(ResponseCreated("resp_9"), 1.6)
    turns.handle(AudioDelta("resp_9", "item_9", ONE_SECOND_OF_AUDIO), 1.7)
    assert turns.first_utterance_protected and turns.first_response_id == "resp_9"
    assert not model_events(turns.handle(VoiceOnset(120), 1.9), "response.cancel")


def test_a_closing_line_not_yet_heard_is_asked_of_the_new_session():
    turns = greeted_call()
    turns.handle(CloseCall("max_duration"), 10.0)
    turns.handle(ResponseCreated("resp_9"), 10.1)  # the closing line, lost before any of it came
    actions = turns.handle(ModelReconnected(), 10.5)
    closing_request = {**protocol.response_create(SETTINGS.closing_instructions), "event_id": "callgate_closing_line"}
    assert model_events(actions)[-1] == closing_request


def test_heard_text_of_a_transcript_heard_to_the_end_is_the_transcript_as_it_came():
    assert heard_text("Hello,  there.\nHow are you?", 1000, 1000) == "Hello,  there.\nHow are you?"
    assert heard_text("one two", 0, 20) == ""


def test_an_answer_the_model_began_unasked_is_asked_again_of_the_new_session():
    turns = greeted_call()
    turns.handle(ResponseCreated("resp_2"), 3.0)  # the model's own turn detection answered: no reply was owed
    turns.handle(AudioDelta("resp_2", "item_2", ONE_SECOND_OF_AUDIO), 3.1)
    assert model_events(turns.handle(ModelReconnected(), 3.5), "response.create") == [protocol.response_create()]


def test_only_items_heard_and_transcribed_are_restored():
    turns = greeted_with_transcript()
    turns.handle(ResponseCreated("resp_2"), 3.0)
    heard_marks = marks(turns.handle(AudioDelta("resp_2", "item_2", ONE_SECOND_OF_AUDIO), 3.1))
    turns.handle(AudioDelta("resp_2", "item_3", ONE_SECOND_OF_AUDIO), 3.2)  # never heard
    turns.handle(TranscriptDone("resp_2", "item_3", "and on Mondays too"), 3.3)
    turns.handle(AudioDelta("resp_2", "item_4", ONE_SECOND_OF_AUDIO), 3.3)  # heard, its transcript never came
    play_all(turns, heard_marks, 4.1)
    actions = turns.handle(ModelReconnected(), 4.5)
    assert [action for action in actions if isinstance(action, RecordTranscript)] == []
    assert model_events(actions, "conversation.item.create") == [protocol.assistant_text_item("Hello, how can I help?")]


def test_a_closing_line_asked_for_but_not_begun_is_asked_of_the_new_session():
    turns = greeted_call()
    turns.handle(CloseCall("max_duration"), 10.0)
    actions = turns.handle(ModelReconnected(), 10.5)
    closing_request = {**protocol.response_create(SETTINGS.closing_instructions), "event_id": "callgate_closing_line"}
    assert model_events(actions)[-1] == closing_request


def test_after_the_closing_line_was_heard_a_reopened_session_is_asked_nothing():
    turns = greeted_call()
    turns.handle(CloseCall("max_duration"), 10.0)
    turns.handle(ResponseCreated("resp_9"), 10.1)
    line_marks = marks(turns.handle(AudioDelta("resp_9", "item_9", ONE_SECOND_OF_AUDIO), 10.2))
    turns.handle(ResponseDone("resp_9", "completed"), 10.3)
    assert HangUp("max_duration") in play_all(turns, line_marks, 11.2)
    actions = turns.handle(ModelReconnected(), 11.5)
    assert model_events(actions, "response.create") == [] and HangUp("max_duration") not in actions

