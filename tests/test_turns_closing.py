"""Closing a call: the bot is silenced, says its closing line to the end, then the call hangs up."""

from __future__ import annotations

from app.realtime import protocol
from app.settings import Settings
from app.turn_events import (
    AudioDelta, CallStarted, ClearCarrier, CloseCall, DtmfPressed, HangUp, Log, ModelError, RecordEvent,
    ResponseCreated, ResponseDone, SendToModel, StopPlayback, TranscriptDone, VoiceOnset,
)
from app.turns import Turns
from tests.test_turns import ONE_SECOND_OF_AUDIO, answering_call, greeted_call, marks, play_all

SETTINGS = Settings()
CLOSING_LINE_REQUEST = SendToModel({**protocol.response_create(SETTINGS.closing_instructions),
                                    "event_id": "callgate_closing_line"})


def closing(reason: str) -> list:
    return [Log("CALL", "closing the call: the closing line, then the hang-up", {"reason": reason}),
            RecordEvent("closing", {"reason": reason})]


def hung_up(reason: str) -> list:
    return [Log("CALL", "closing line heard, hanging up", {"reason": reason}), HangUp(reason)]


def say_closing_line(turns: Turns, now: float) -> list:
    """The model says a one-second closing line (resp_9); the actions of its last mark coming back."""
    assert turns.handle(ResponseCreated("resp_9"), now) == []
    line_marks = marks(turns.handle(AudioDelta("resp_9", "item_9", ONE_SECOND_OF_AUDIO), now + 0.1))
    assert turns.handle(ResponseDone("resp_9", "completed"), now + 0.2) == []
    before_last = play_all(turns, line_marks[:-1], now + 1.0)
    assert all(not isinstance(action, HangUp) for action in before_last)
    return play_all(turns, line_marks[-1:], now + 1.1)


def test_a_quiet_call_gets_its_closing_line_at_once_and_hangs_up_once_it_is_heard():
    turns = greeted_call()
    assert turns.handle(CloseCall("max_duration"), 20.0) == [*closing("max_duration"), CLOSING_LINE_REQUEST]
    assert say_closing_line(turns, 20.1) == hung_up("max_duration")


def test_the_answer_playing_is_stopped_and_the_line_requested_once_the_model_has_ended_it():
    turns, answer_marks = answering_call()
    play_all(turns, answer_marks[:10], 6.1)  # one second of the answer heard
    assert turns.handle(CloseCall("shutdown"), 6.2) == [
        *closing("shutdown"), StopPlayback("resp_2"), ClearCarrier(),
        SendToModel(protocol.response_cancel("resp_2")), SendToModel(protocol.item_truncate("item_2", 1000))]
    # The model takes one response at a time: the closing line is asked for once the cancelled one is done.
    assert turns.handle(ResponseDone("resp_2", "cancelled"), 6.3) == [CLOSING_LINE_REQUEST]
    assert say_closing_line(turns, 6.4) == hung_up("shutdown")


def test_the_caller_cannot_interrupt_the_closing_line():
    turns = greeted_call()
    turns.handle(CloseCall("max_duration"), 20.0)
    turns.handle(ResponseCreated("resp_9"), 20.1)
    turns.handle(AudioDelta("resp_9", "item_9", ONE_SECOND_OF_AUDIO), 20.2)
    assert turns.bot_audible and turns.handle(VoiceOnset(120), 20.5) == []


def test_a_response_the_model_starts_on_its_own_before_the_request_is_cancelled():
    turns, _ = answering_call()
    turns.handle(CloseCall("shutdown"), 6.0)
    # The model's turn detection answered the caller before our cancel reached it.
    assert turns.handle(ResponseCreated("resp_3"), 6.1) == [SendToModel(protocol.response_cancel("resp_3"))]
    assert turns.handle(ResponseDone("resp_2", "cancelled"), 6.2) == []
    assert turns.handle(ResponseDone("resp_3", "cancelled"), 6.3) == [CLOSING_LINE_REQUEST]
    assert say_closing_line(turns, 6.4) == hung_up("shutdown")


def test_a_refused_closing_request_is_made_again_once_the_model_is_quiet():
    turns = greeted_call()
    turns.handle(CloseCall("max_duration"), 20.0)
    turns.handle(ResponseCreated("resp_5"), 20.05)  # not ours: cancelled
    refusal = ModelError("conversation_already_has_active_response", "busy", "callgate_closing_line")
    assert CLOSING_LINE_REQUEST not in turns.handle(refusal, 20.1)
    assert turns.handle(ResponseDone("resp_5", "cancelled"), 20.2) == [CLOSING_LINE_REQUEST]


def test_a_closing_line_without_audio_hangs_up_when_the_model_ends_it():
    turns = greeted_call()
    turns.handle(CloseCall("max_duration"), 20.0)
    turns.handle(ResponseCreated("resp_9"), 20.1)
    assert turns.handle(ResponseDone("resp_9", "failed"), 20.2) == hung_up("max_duration")


def test_closing_during_the_greeting_ends_its_protection_and_silences_it():
    turns = Turns(SETTINGS)
    turns.handle(CallStarted(), 0.0)
    turns.handle(ResponseCreated("resp_1"), 0.1)
    turns.handle(AudioDelta("resp_1", "item_1", ONE_SECOND_OF_AUDIO), 0.2)
    actions = turns.handle(CloseCall("shutdown"), 0.5)
    assert actions[:4] == [*closing("shutdown"), Log("FIRST_UTTERANCE", "Barge-in now ENABLED for rest of call", {
        "resp": "resp_1", "why": "the call is closing"}), RecordEvent("first_utterance_end", {
            "response_id": "resp_1", "why": "the call is closing"})]
    assert actions[4:7] == [StopPlayback("resp_1"), ClearCarrier(), SendToModel(protocol.response_cancel("resp_1"))]
    assert not turns.first_utterance_protected


def test_closing_twice_changes_nothing_and_a_key_press_asks_for_no_answer_meanwhile():
    turns = greeted_call()
    turns.handle(CloseCall("max_duration"), 20.0)
    assert turns.handle(CloseCall("shutdown"), 20.1) == []
    assert all(action != SendToModel(protocol.response_create()) for action in turns.handle(DtmfPressed("5"), 20.2))
    assert say_closing_line(turns, 20.3) == hung_up("max_duration")


def test_the_closing_line_is_recorded_in_the_transcript():
    turns = greeted_call()
    turns.handle(CloseCall("max_duration"), 20.0)
    turns.handle(ResponseCreated("resp_9"), 20.1)
    line_marks = marks(turns.handle(AudioDelta("resp_9", "item_9", ONE_SECOND_OF_AUDIO), 20.2))
    turns.handle(TranscriptDone("resp_9", "item_9", "Goodbye!"), 20.3)
    turns.handle(ResponseDone("resp_9", "completed"), 20.3)
    actions = play_all(turns, line_marks, 21.2)
    assert [action.text for action in actions if hasattr(action, "text")] == ["Goodbye!"]
    assert actions[-1] == HangUp("max_duration")


def test_audio_of_a_response_the_model_starts_on_its_own_while_closing_is_never_played():
    turns, _ = answering_call()
    turns.handle(CloseCall("shutdown"), 6.0)
    assert turns.handle(ResponseCreated("resp_3"), 6.1) == [SendToModel(protocol.response_cancel("resp_3"))]
    assert marks(turns.handle(AudioDelta("resp_3", "item_3", ONE_SECOND_OF_AUDIO), 6.15)) == []
    assert not turns.bot_audible


def test_an_error_about_another_request_leaves_the_closing_line_to_end_the_call():
    turns = greeted_call()
    turns.handle(CloseCall("max_duration"), 20.0)
    turns.handle(ResponseCreated("resp_9"), 20.1)
    line_marks = marks(turns.handle(AudioDelta("resp_9", "item_9", ONE_SECOND_OF_AUDIO), 20.2))
    turns.handle(ResponseDone("resp_9", "completed"), 20.3)
    assert CLOSING_LINE_REQUEST not in turns.handle(ModelError("item_truncate_invalid", "no such item", "other"), 20.4)
    assert play_all(turns, line_marks, 21.2) == hung_up("max_duration")
