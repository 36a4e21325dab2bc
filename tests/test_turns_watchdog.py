"""The reply watchdog: a reply owed and no sign of it from the model is asked for once more, then the call ends."""

from __future__ import annotations

from app.realtime import protocol
from app.settings import Settings
from app.turn_events import (
    AudioDelta, CallerTurnCommitted, CallStarted, ClearCarrier, CloseCall, DtmfPressed, HangUp, Log, ModelError,
    RecordEvent, ResponseCreated, ResponseDone, SendToModel, StopPlayback, Tick, VoiceOnset,
)
from app.turns import Turns
from tests.test_turns import ONE_SECOND_OF_AUDIO, answering_call, greeted_call, marks, model_events, play_all

TIMEOUT_S = Settings().model_reply_timeout_s
ASK_AGAIN = SendToModel(protocol.response_create())


def log_messages(actions) -> list[str]:
    return [action.message for action in actions if isinstance(action, Log)]


def ended(actions) -> bool:
    return HangUp("model_unresponsive") in actions


def test_a_caller_turn_the_model_never_answers_is_asked_once_more_then_the_call_ends():
    turns = greeted_call()
    assert turns.handle(CallerTurnCommitted("item_caller"), 10.0) == []
    assert turns.handle(Tick(), 10.0 + TIMEOUT_S - 0.02) == []
    asked = turns.handle(Tick(), 10.0 + TIMEOUT_S)
    assert asked == [Log("MODEL", "no sign of a reply from the model; asking again",
                         {"timeout_s": TIMEOUT_S, "stalled": ""}, "warning"), ASK_AGAIN]
    assert turns.handle(Tick(), 10.0 + 2 * TIMEOUT_S - 0.02) == []
    assert turns.handle(Tick(), 10.0 + 2 * TIMEOUT_S) == [
        Log("MODEL", "no reply from the model after asking again; ending the call", {"timeout_s": TIMEOUT_S}, "error"),
        RecordEvent("error", {"code": "model_unresponsive", "timeout_s": TIMEOUT_S}),
        HangUp("model_unresponsive"),
    ]
    assert turns.handle(Tick(), 10.0 + 5 * TIMEOUT_S) == []  # ended once


def test_a_reply_that_comes_disarms_the_watchdog():
    turns = greeted_call()
    turns.handle(CallerTurnCommitted("item_caller"), 10.0)
    turns.handle(ResponseCreated("resp_2"), 10.5)
    answer_marks = marks(turns.handle(AudioDelta("resp_2", "item_2", ONE_SECOND_OF_AUDIO), 10.6))
    assert turns.handle(ResponseDone("resp_2", "completed"), 10.7) == []
    play_all(turns, answer_marks, 11.7)
    assert turns.handle(Tick(), 10.0 + 10 * TIMEOUT_S) == []


def test_a_reply_that_keeps_coming_slowly_is_never_taken_for_silence():
    turns = greeted_call()
    turns.handle(CallerTurnCommitted("item_caller"), 10.0)
    turns.handle(ResponseCreated("resp_2"), 10.0 + TIMEOUT_S - 0.1)
    for step in range(1, 4):
        now = 10.0 + step * (TIMEOUT_S - 0.1)
        assert turns.handle(AudioDelta("resp_2", "item_2", ONE_SECOND_OF_AUDIO), now) != []
        assert turns.handle(Tick(), now + TIMEOUT_S - 0.05) == []


def test_a_response_that_stalls_mid_answer_is_stopped_once_and_asked_for_again():
    turns, answer_marks = answering_call()
    turns.handle(CallerTurnCommitted("item_caller"), 5.05)
    play_all(turns, answer_marks[:10], 6.1)  # the caller heard one second, then the model went quiet
    asked = turns.handle(Tick(), 5.1 + TIMEOUT_S)
    assert asked == [
        Log("MODEL", "no sign of a reply from the model; asking again",
            {"timeout_s": TIMEOUT_S, "stalled": "resp_2"}, "warning"),
        StopPlayback("resp_2"), ClearCarrier(), SendToModel(protocol.response_cancel("resp_2")),
        SendToModel(protocol.item_truncate("item_2", 1000)), ASK_AGAIN,
    ]
    assert turns.handle(ResponseDone("resp_2", "cancelled"), 5.2 + TIMEOUT_S) == []
    turns.handle(ResponseCreated("resp_3"), 5.3 + TIMEOUT_S)
    assert not ended(turns.handle(Tick(), 5.3 + 2 * TIMEOUT_S - 0.05))
    assert ended(turns.handle(Tick(), 5.3 + 2 * TIMEOUT_S))  # resp_3 said nothing either


def test_a_cancelled_or_failed_response_is_no_reply():
    for status in ("cancelled", "failed"):
        turns = greeted_call()
        turns.handle(CallerTurnCommitted("item_caller"), 10.0)
        turns.handle(ResponseCreated("resp_2"), 10.1)
        if status == "cancelled":
            turns.handle(AudioDelta("resp_2", "item_2", ONE_SECOND_OF_AUDIO), 10.2)
            turns.handle(VoiceOnset(120), 10.3)  # the caller barged in: we cancelled it
        turns.handle(ResponseDone("resp_2", status), 10.4)
        assert ASK_AGAIN in turns.handle(Tick(), 10.4 + TIMEOUT_S), status


def test_an_error_from_the_model_is_no_sign_of_a_reply():
    turns = greeted_call()
    turns.handle(CallerTurnCommitted("item_caller"), 10.0)
    turns.handle(ModelError("server_error", "try again", ""), 10.0 + TIMEOUT_S - 0.1)
    assert ASK_AGAIN in turns.handle(Tick(), 10.0 + TIMEOUT_S)


def test_a_key_press_is_owed_an_answer_too():
    turns = greeted_call()
    turns.handle(DtmfPressed("5"), 10.0)
    assert ASK_AGAIN in turns.handle(Tick(), 10.0 + TIMEOUT_S)


def test_the_greeting_and_the_closing_line_keep_deadlines_of_their_own():
    turns = Turns(Settings())
    turns.handle(CallStarted(), 0.0)
    turns.handle(CallerTurnCommitted("item_caller"), 0.5)
    assert model_events(turns.handle(Tick(), 0.5 + TIMEOUT_S), "response.create") == []
    turns = greeted_call()
    turns.handle(CallerTurnCommitted("item_caller"), 10.0)
    turns.handle(CloseCall("max_duration"), 10.5)
    turns.handle(CallerTurnCommitted("item_caller"), 11.0)
    assert turns.handle(Tick(), 11.0 + 3 * TIMEOUT_S) == []


def test_the_deadline_is_a_setting():
    turns = greeted_call(Settings(model_reply_timeout_s=2.0))
    turns.handle(CallerTurnCommitted("item_caller"), 10.0)
    assert turns.handle(Tick(), 11.98) == [] and ASK_AGAIN in turns.handle(Tick(), 12.0)
