"""The turn-taking machine under any order of events a model, a carrier and a caller can produce.

Invariants: at most one response.cancel per response, and none after the model ended it; never a cancel
while the greeting is protected; no bot audio after a barge-in until the next response; every event sent
validates against the SDK's client events; and the greeting's protection always ends, however the model
and the carrier behave.
"""

from __future__ import annotations

import collections

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from app.settings import Settings
from app.turn_events import (
    AudioDelta, AudioDone, CallEnding, CallerTurnCommitted, CallStarted, ClearCarrier, CloseCall, DtmfPressed, HangUp, MarkPlayed,
    ModelError, ModelReconnected, OutputItemAdded, PlayAudio, ResponseCreated, ResponseDone, SendToModel, Tick,
    TranscriptDone, VoiceOnset,
)
from app.turns import FIRST_RESPONSE_TIMEOUT_S, Turns
from tests.realtime_schemas import SDK_CLIENT_EVENTS

SETTINGS = Settings()
LONGEST_SILENT_WAIT_S = (
    (SETTINGS.first_response_max_retries + 2) * FIRST_RESPONSE_TIMEOUT_S
    + SETTINGS.first_utterance_safety_margin_ms / 1000 + 60.0)
"""Enough for every deadline of the greeting to pass, with audio generated and none of it played back."""


def response_number(response_id: str) -> int:
    return int(response_id.removeprefix("resp_"))


class Call(RuleBasedStateMachine):
    """A model that answers as it likes, a carrier that plays and flushes marks in order, a caller who talks."""

    @initialize(greeting_heard=st.booleans())
    def start(self, greeting_heard):
        self.turns = Turns(SETTINGS)
        self.now = 0.0
        self.response_count = 0
        self.open_responses: dict[str, str] = {}  # response id -> its item id, until response.done
        self.carrier_marks: collections.deque[str] = collections.deque()
        self.flushed_marks: list[str] = []
        self.responses_before_the_last_clear = 0
        self.ended_responses: set[str] = set()
        self.cancels: collections.Counter[str] = collections.Counter()
        self.create_event_ids: list[str] = [""]
        self.hung_up = False
        self.handle(CallStarted())
        if greeting_heard:  # half the calls start past the greeting, where barge-in is allowed
            self.model_starts_a_response()
            self._send_audio("resp_1", 900)
            self._end_response("resp_1", "completed")
            self._play(len(self.carrier_marks))
            assert not self.turns.first_utterance_protected

    def handle(self, event):
        protected_before = self.turns.first_utterance_protected
        actions = self.turns.handle(event, self.now)
        sent = [action.event for action in actions if isinstance(action, SendToModel)]
        for model_event in sent:
            SDK_CLIENT_EVENTS.validate_python(model_event)
            if model_event["type"] == "response.cancel":
                self.cancels[model_event["response_id"]] += 1
                assert self.cancels[model_event["response_id"]] == 1, f"second cancel after {event}"
                assert model_event["response_id"] not in self.ended_responses, f"cancel of an ended one on {event}"
                assert not protected_before or isinstance(event, CloseCall), f"cancel in the greeting on {event}"
            if model_event["type"] == "response.create":
                self.create_event_ids.append(model_event.get("event_id", ""))
        for action in actions:
            match action:
                case PlayAudio(response_id, _, mark):
                    assert response_number(response_id) > self.responses_before_the_last_clear, (
                        f"audio of a response the caller talked over, on {event}")
                    self.carrier_marks.append(mark)
                case ClearCarrier():
                    self.responses_before_the_last_clear = self.response_count
                    self.flushed_marks.extend(self.carrier_marks)
                    self.carrier_marks.clear()
                case HangUp():
                    self.hung_up = True
        return actions

    @precondition(lambda self: not self.hung_up)
    @rule()
    def model_starts_a_response(self):
        self.response_count += 1
        response_id, item_id = f"resp_{self.response_count}", f"item_{self.response_count}"
        self.open_responses[response_id] = item_id
        self.handle(ResponseCreated(response_id))
        self.handle(OutputItemAdded(response_id, item_id))

    @precondition(lambda self: self.open_responses and not self.hung_up)
    @rule(data=st.data(), audio_ms=st.integers(min_value=1, max_value=700))
    def model_sends_audio(self, data, audio_ms):
        self._send_audio(data.draw(st.sampled_from(sorted(self.open_responses))), audio_ms)

    def _send_audio(self, response_id, audio_ms):
        self.handle(AudioDelta(response_id, self.open_responses[response_id], b"\xff" * (audio_ms * 8)))

    @precondition(lambda self: self.open_responses and not self.hung_up)
    @rule(data=st.data(), status=st.sampled_from(["completed", "cancelled", "failed", "incomplete"]))
    def model_ends_a_response(self, data, status):
        self._end_response(data.draw(st.sampled_from(sorted(self.open_responses))), status)

    def _end_response(self, response_id, status):
        item_id = self.open_responses.pop(response_id)
        self.handle(AudioDone(response_id))
        self.handle(TranscriptDone(response_id, item_id, "שלום, במה אפשר לעזור?"))
        self.handle(ResponseDone(response_id, status))
        self.ended_responses.add(response_id)

    @precondition(lambda self: not self.hung_up)
    @rule(code=st.sampled_from(["response_cancel_not_active", "server_error", "invalid_value"]), data=st.data())
    def model_reports_an_error(self, code, data):
        event_id = data.draw(st.sampled_from(self.create_event_ids))
        self.handle(ModelError(code, "something went wrong", event_id))

    @precondition(lambda self: self.carrier_marks and not self.hung_up)
    @rule(count=st.integers(min_value=1, max_value=6))
    def carrier_plays(self, count):
        self._play(min(count, len(self.carrier_marks)))

    def _play(self, count):
        for _ in range(count):
            self.now += SETTINGS.playback_chunk_ms / 1000
            self.handle(MarkPlayed(self.carrier_marks.popleft()))

    @precondition(lambda self: self.flushed_marks and not self.hung_up)
    @rule()
    def carrier_returns_the_flushed_marks(self):
        for name in self.flushed_marks:
            self.handle(MarkPlayed(name))
        self.flushed_marks.clear()

    @precondition(lambda self: not self.hung_up)
    @rule(voiced_ms=st.integers(min_value=20, max_value=2000))
    def caller_talks(self, voiced_ms):
        self.handle(VoiceOnset(voiced_ms))

    @precondition(lambda self: not self.hung_up)
    @rule()
    def model_link_is_lost_and_reopened(self):
        self.handle(ModelReconnected())
        self.open_responses.clear()  # a new session never speaks of the lost one's responses

    @precondition(lambda self: not self.hung_up)
    @rule()
    def model_takes_the_callers_turn_as_finished(self):
        self.handle(CallerTurnCommitted("item_caller"))

    @precondition(lambda self: not self.hung_up)
    @rule(digit=st.sampled_from("0123456789*#"))
    def caller_presses_a_key(self, digit):
        self.handle(DtmfPressed(digit))

    @rule(seconds=st.floats(min_value=0.01, max_value=12.0))
    def time_passes(self, seconds):
        self.now += seconds
        self.handle(Tick())

    @precondition(lambda self: not self.hung_up)
    @rule()
    def the_call_is_closed(self):
        self.handle(CloseCall("max_duration"))

    def teardown(self):
        if not hasattr(self, "turns"):
            return
        # From here the model and the carrier say nothing more: only time passes.
        waited_s = 0.0
        while self.turns.first_utterance_protected and waited_s < LONGEST_SILENT_WAIT_S:
            self.now += 1.0
            waited_s += 1.0
            self.handle(Tick())
        assert not self.turns.first_utterance_protected, "the greeting's protection never ended"
        self.handle(CallEnding("caller_hung_up"))


TestTurnsUnderAnyEvents = Call.TestCase
TestTurnsUnderAnyEvents.settings = settings(max_examples=150, stateful_step_count=40)
