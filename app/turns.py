"""The call's turn-taking rules as one pure state machine: handle(event, now) -> actions.

No I/O and no clock: `now` is passed in (seconds). The call's trio tasks feed events in and
carry the returned actions out, in order.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from app.realtime import protocol
from app.settings import Settings
from app.turn_events import (
    AudioDelta, AudioDone, CallEnding, CallerTranscript, CallerTurnCommitted, CallStarted, ClearCarrier, CloseCall, DtmfPressed, HangUp, Log, MarkPlayed,
    ModelError, OutputItemAdded, PlayAudio, RecordEvent, RecordTranscript, ResponseCreated, ResponseDone, SendToModel,
    ModelReconnected, StopPlayback, Tick, TranscriptDone, TurnAction, TurnEvent, VoiceOnset,
)

MULAW_BYTES_PER_MS = 8
FIRST_RESPONSE_TIMEOUT_S = 10.0
FIRST_RESPONSE_EVENT_PREFIX = "callgate_first_response_"
CLOSING_LINE_EVENT_ID = "callgate_closing_line"
# What shows the model is at work on a reply (an error does not).
MODEL_PROGRESS_EVENTS = (ResponseCreated, OutputItemAdded, AudioDelta, AudioDone, TranscriptDone, ResponseDone)


def heard_text(transcript: str, played_ms: int, generated_ms: int) -> str:
    """The words of `transcript` the caller heard, taking its words as evenly spread over its audio."""
    if played_ms >= generated_ms:
        return transcript
    words = transcript.split()
    return " ".join(words[:round(len(words) * played_ms / generated_ms)])


def _history_item(role: str, text: str) -> dict:
    return protocol.user_text_item(text) if role == "user" else protocol.assistant_text_item(text)


class InboundDisposition(enum.Enum):
    """What the model hears of one inbound frame."""

    AUDIO = "audio"
    SILENCE = "silence"
    DROP = "drop"


_GREETING_LOCK_DISPOSITIONS = {
    "silence": InboundDisposition.SILENCE,
    "drop": InboundDisposition.DROP,
    "pass": InboundDisposition.AUDIO,
}


@dataclass(slots=True)
class ItemAudio:
    item_id: str
    started_at_s: float
    generated_ms: int = 0
    played_ms: int = 0
    transcript: str = ""
    settled: bool = False  # recorded in the transcript, or deleted from the model's memory


@dataclass(slots=True)
class ResponseState:
    response_id: str
    active: bool = True
    silenced: bool = False
    items: dict[str, ItemAudio] = field(default_factory=dict)
    pending_marks: set[str] = field(default_factory=set)

    @property
    def generated_ms(self) -> int:
        return sum(item.generated_ms for item in self.items.values())

    @property
    def unplayed_ms(self) -> int:
        return sum(item.generated_ms - item.played_ms for item in self.items.values())

    @property
    def audible(self) -> bool:
        return not self.silenced and (self.active or bool(self.pending_marks))

    @property
    def finished(self) -> bool:
        return not self.active and not self.pending_marks and all(item.settled for item in self.items.values())


class ClosingPhase(enum.Enum):
    QUIETING = "quieting"  # waiting for the responses we cancelled to end: the model takes one at a time
    REQUESTED = "requested"
    PLAYING = "playing"
    OVER = "over"


@dataclass(slots=True)
class Closing:
    """The call is ending: the bot says its closing line to the end, then the call hangs up with `reason`."""

    reason: str
    phase: ClosingPhase = ClosingPhase.QUIETING
    response_id: str = ""


@dataclass(slots=True)
class ReplyWatch:
    """A reply is owed to the caller: the model must show it is working on one by `deadline`."""

    deadline: float
    asked_again: bool = False


@dataclass(frozen=True, slots=True)
class MarkPosition:
    response_id: str
    item_id: str
    item_end_ms: int


class Turns:
    """Who may speak when: first-utterance protection, greeting lock and barge-in."""

    def __init__(self, settings: Settings, *, barge_in_enabled: bool = True) -> None:
        self.settings = settings
        self.barge_in_enabled = barge_in_enabled
        self.first_utterance_protected = True
        self.first_response_id: str | None = None
        self._awaiting_first_response = False
        self._first_response_attempts = 0
        self._protection_deadline: float | None = None
        self._protection_deadline_why = ""
        self._responses: dict[str, ResponseState] = {}
        self._cancelled_response_ids: set[str] = set()
        self._marks: dict[str, MarkPosition] = {}
        self._mark_count = 0
        self._sound_since_s: float | None = None
        self._closing: Closing | None = None
        self._reply_watch: ReplyWatch | None = None
        self._caller_turns_committed: dict[str, float] = {}  # caller turn item id -> when, until transcribed
        # The conversation as the caller heard it, (role, text): what a new model session is told after a lost link.
        self._heard: list[tuple[str, str]] = []
        self._chunk_bytes = settings.playback_chunk_ms * MULAW_BYTES_PER_MS

    @property
    def bot_audible(self) -> bool:
        """The caller hears, or is about to hear, the bot: a live response or audio not yet played."""
        return any(response.audible for response in self._responses.values())

    def inbound_disposition(self, caller_audio: bool) -> InboundDisposition:
        """While the bot is audible the model hears only what the inbound path takes for the caller."""
        if self.first_utterance_protected:
            return _GREETING_LOCK_DISPOSITIONS[self.settings.greeting_lock_mode]
        if self.bot_audible and not caller_audio:
            return InboundDisposition.SILENCE
        return InboundDisposition.AUDIO

    def handle(self, event: TurnEvent, now: float) -> list[TurnAction]:
        actions = self._check_protection_deadline(now)
        actions.extend(self._check_reply_deadline(now))
        if isinstance(event, MODEL_PROGRESS_EVENTS):
            self._model_progressed(now)
        actions.extend(self._dispatch(event, now))
        actions.extend(self._advance_closing())
        self._forget_finished_responses()
        return actions

    def _dispatch(self, event: TurnEvent, now: float) -> list[TurnAction]:
        match event:
            case CallStarted():
                return [SendToModel(protocol.session_update(self.settings)), *self._request_first_response(now)]
            case ResponseCreated(response_id):
                return self._on_response_created(response_id, now)
            case OutputItemAdded(response_id, item_id):
                return self._on_item_added(response_id, item_id, now)
            case AudioDelta(response_id, item_id, audio):
                return self._on_audio_delta(response_id, item_id, audio, now)
            case AudioDone(response_id):
                return self._on_audio_done(response_id, now)
            case TranscriptDone(response_id, item_id, transcript):
                return self._on_transcript(response_id, item_id, transcript, now)
            case ResponseDone(response_id, status):
                return self._on_response_done(response_id, status, now)
            case ModelError():
                return self._on_model_error(event, now)
            case MarkPlayed(name):
                return self._on_mark_played(name)
            case VoiceOnset(voiced_ms):
                return self._on_voice_onset(voiced_ms, now)
            case CallerTurnCommitted(item_id):
                self._caller_turns_committed[item_id] = now
                return self._expect_reply(now)
            case CallerTranscript(item_id, transcript):
                return self._on_caller_transcript(item_id, transcript, now)
            case DtmfPressed(digit):
                return self._on_dtmf(digit, now)
            case CloseCall(reason):
                return self._on_close_call(reason)
            case ModelReconnected():
                return self._on_model_reconnected(now)
            case CallEnding(reason):
                return self._on_call_ending(reason)
            case Tick():
                return []
        raise TypeError(f"unknown turn event {event!r}")

    # First utterance: protected from barge-in until the caller has heard it to the end.
    def _request_first_response(self, now: float) -> list[TurnAction]:
        self._first_response_attempts += 1
        self._awaiting_first_response = True
        self._set_protection_deadline(now + FIRST_RESPONSE_TIMEOUT_S, "no response.created in time")
        create = protocol.response_create()
        create["event_id"] = f"{FIRST_RESPONSE_EVENT_PREFIX}{self._first_response_attempts}"
        return [SendToModel(create)]

    def _set_protection_deadline(self, deadline: float, why: str) -> None:
        self._protection_deadline = deadline
        self._protection_deadline_why = why

    def _on_response_created(self, response_id: str, now: float) -> list[TurnAction]:
        response = self._responses.setdefault(response_id, ResponseState(response_id))
        if self._closing is not None:
            return self._on_response_created_while_closing(response)
        if not (self.first_utterance_protected and self._awaiting_first_response):
            return []
        self._awaiting_first_response = False
        self.first_response_id = response_id
        self._set_protection_deadline(now + FIRST_RESPONSE_TIMEOUT_S, "first response stalled")
        return [Log("FIRST_UTTERANCE", "NO barge-in until first response completes", {"resp": response_id})]

    def _retry_or_release_first(self, reason: str, now: float) -> list[TurnAction]:
        if self._first_response_attempts <= self.settings.first_response_max_retries:
            log = Log("FIRST_UTTERANCE", "first response failed, sending it again", {
                "reason": reason, "attempt": self._first_response_attempts + 1}, level="warning")
            return [log, *self._request_first_response(now)]
        return self._release_protection(f"first response failed {self._first_response_attempts} times: {reason}")

    def _release_protection(self, why: str) -> list[TurnAction]:
        self.first_utterance_protected = False
        self._protection_deadline = None
        self._awaiting_first_response = False
        return [
            Log("FIRST_UTTERANCE", "Barge-in now ENABLED for rest of call", {"resp": self.first_response_id, "why": why}),
            RecordEvent("first_utterance_end", {"response_id": self.first_response_id, "why": why}),
        ]

    def _check_first_played(self) -> list[TurnAction]:
        first = self._responses.get(self.first_response_id or "")
        if not self.first_utterance_protected or first is None or first.active or first.pending_marks:
            return []
        if first.generated_ms == 0:
            return self._release_protection("first response produced no audio")
        return self._release_protection("first response fully played")

    def _check_protection_deadline(self, now: float) -> list[TurnAction]:
        if not self.first_utterance_protected or self._protection_deadline is None or now < self._protection_deadline:
            return []
        if self._awaiting_first_response:
            return self._retry_or_release_first(self._protection_deadline_why, now)
        return self._release_protection(self._protection_deadline_why)

    def _first_generation_ended(self, response: ResponseState, now: float) -> None:
        """Safety net: the final mark gets the buffered audio plus a margin to come back."""
        if response.response_id == self.first_response_id and self.first_utterance_protected:
            deadline = now + (response.unplayed_ms + self.settings.first_utterance_safety_margin_ms) / 1000
            self._set_protection_deadline(deadline, "final mark not back within buffered audio plus safety margin")

    # Model output.
    def _item(self, response: ResponseState, item_id: str, now: float) -> ItemAudio:
        return response.items.setdefault(item_id, ItemAudio(item_id, started_at_s=now))

    def _on_item_added(self, response_id: str, item_id: str, now: float) -> list[TurnAction]:
        response = self._responses.get(response_id)
        if response is not None:
            self._item(response, item_id, now)
        return []

    def _on_audio_delta(self, response_id: str, item_id: str, audio: bytes, now: float) -> list[TurnAction]:
        response = self._responses.get(response_id)
        if response is None or response.silenced:
            return []  # late deltas of a cancelled response: nobody must hear them
        if not any(r.pending_marks for r in self._responses.values()):
            self._sound_since_s = now
        if response_id == self.first_response_id and self.first_utterance_protected:
            self._set_protection_deadline(now + FIRST_RESPONSE_TIMEOUT_S, "first response stalled")
        item = self._item(response, item_id, now)
        actions: list[TurnAction] = []
        for start in range(0, len(audio), self._chunk_bytes):
            chunk = audio[start:start + self._chunk_bytes]
            item.generated_ms += len(chunk) // MULAW_BYTES_PER_MS
            self._mark_count += 1
            name = f"{response_id}:{self._mark_count}"
            self._marks[name] = MarkPosition(response_id, item_id, item.generated_ms)
            response.pending_marks.add(name)
            actions.append(PlayAudio(response_id, chunk, name))
        return actions

    def _on_audio_done(self, response_id: str, now: float) -> list[TurnAction]:
        response = self._responses.get(response_id)
        if response is not None:
            self._first_generation_ended(response, now)
        return []

    def _on_transcript(self, response_id: str, item_id: str, transcript: str, now: float) -> list[TurnAction]:
        response = self._responses.get(response_id)
        if response is None:
            return []
        self._item(response, item_id, now).transcript = transcript
        return self._settle_items(response)

    def _on_response_done(self, response_id: str, status: str, now: float) -> list[TurnAction]:
        response = self._responses.get(response_id)
        if response is None:
            return [Log("MODEL", "response.done for an unknown response", {"resp": response_id}, "warning")]
        response.active = False
        if status != "failed" and not response.silenced and not any(r.active for r in self._responses.values()):
            self._reply_watch = None  # replied (a failed one is asked again; a cancelled one was no reply)
        if response_id == self.first_response_id and self.first_utterance_protected and status == "failed":
            return self._retry_or_release_first(f"status={status}", now)
        self._first_generation_ended(response, now)
        return [*self._check_first_played(), *self._settle_items(response)]

    def _on_model_error(self, error: ModelError, now: float) -> list[TurnAction]:
        raced_our_cancel = error.code == "response_cancel_not_active" and bool(self._cancelled_response_ids)
        fields = {"code": error.code, "event_id": error.event_id}
        if raced_our_cancel:
            return [Log("MODEL_ERROR", "our cancel crossed the response's end; nothing to do", fields)]
        actions: list[TurnAction] = [
            Log("MODEL_ERROR", error.message, fields, "error"),
            RecordEvent("error", {"code": error.code, "message": error.message}),
        ]
        if error.event_id == CLOSING_LINE_EVENT_ID and self._closing is not None:
            self._closing.phase = ClosingPhase.QUIETING  # asked again once the model is quiet
        answers_current_request = error.event_id == f"{FIRST_RESPONSE_EVENT_PREFIX}{self._first_response_attempts}"
        if answers_current_request and self._awaiting_first_response and self.first_utterance_protected:
            actions.extend(self._retry_or_release_first(f"error {error.code}", now))
        return actions

    # Playback progress.
    def _on_mark_played(self, name: str) -> list[TurnAction]:
        position = self._marks.pop(name, None)
        if position is None:
            return []  # an echo after clear: flushed, not played
        response = self._responses[position.response_id]
        response.pending_marks.discard(name)
        item = response.items[position.item_id]
        item.played_ms = max(item.played_ms, position.item_end_ms)
        return [*self._check_first_played(), *self._settle_items(response)]

    def _settle_items(self, response: ResponseState) -> list[TurnAction]:
        """Once nothing more of a response can be heard: heard items to the transcript; items that only
        appeared after a barge-in are forgotten by the model too."""
        if response.active or response.pending_marks:
            return []
        actions: list[TurnAction] = []
        for item in response.items.values():
            if item.settled:
                continue
            if item.played_ms == 0 and response.silenced:
                actions.append(SendToModel(protocol.item_delete(item.item_id)))
                item.settled = True
            elif item.played_ms > 0 and item.transcript:
                actions.append(self._record_item(item))
        return actions

    def _record_item(self, item: ItemAudio) -> RecordTranscript:
        item.settled = True
        truncated = item.played_ms < item.generated_ms
        self._heard.append(("assistant", heard_text(item.transcript, item.played_ms, item.generated_ms)))
        return RecordTranscript("assistant", item.transcript, item.started_at_s, truncated, item.played_ms)

    def _forget_finished_responses(self) -> None:
        for response_id in [r.response_id for r in self._responses.values() if r.finished]:
            del self._responses[response_id]

    # Barge-in: the one condition and the one place that cancels.
    def _on_voice_onset(self, voiced_ms: int, now: float) -> list[TurnAction]:
        if not self.bot_audible or self._closing is not None:
            return []  # nothing to stop, or a closing line, which is said to the end
        if self.first_utterance_protected:
            return [Log("FIRST_UTTERANCE", "caller speech ignored while the first utterance plays",
                        {"resp": self.first_response_id})]
        if not (self.settings.enable_barge_in and self.barge_in_enabled):
            return []
        return self._barge_in(voiced_ms, now)

    def _barge_in(self, voiced_ms: int, now: float) -> list[TurnAction]:
        audible, actions = self._silence_audible()
        # The caller's voiced run overlapped the bot's sound only since that sound began.
        sounding_ms = 0 if self._sound_since_s is None else round((now - self._sound_since_s) * 1000)
        talk_over_ms = min(voiced_ms, sounding_ms)
        heard = {item.item_id: item.played_ms for response in audible for item in response.items.values()}
        actions.append(Log("BARGE_IN", "caller talked over the bot, bot silenced", {
            "resp": ",".join(response.response_id for response in audible), "talk_over_ms": talk_over_ms,
            "heard_ms": sum(heard.values())}))
        actions.append(RecordEvent("barge_in", {"talk_over_ms": talk_over_ms, "heard_ms": heard}))
        return actions

    def _silence_audible(self) -> tuple[list[ResponseState], list[TurnAction]]:
        """Stop every response the caller hears or is about to: playback, the carrier's buffer, the model."""
        audible = [response for response in self._responses.values() if response.audible]
        if not audible:
            return [], []
        actions: list[TurnAction] = [StopPlayback(response.response_id) for response in audible]
        actions.append(ClearCarrier())
        for response in audible:
            response.silenced = True
            for name in response.pending_marks:
                del self._marks[name]  # their echoes after clear mean flushed, not played
            response.pending_marks.clear()
            if response.active:  # a silenced response is never audible again: one cancel per response
                actions.append(self._cancel(response))
            actions.extend(self._forget_unheard(response))
            actions.extend(self._settle_items(response))
        return audible, actions

    def _cancel(self, response: ResponseState) -> SendToModel:
        self._cancelled_response_ids.add(response.response_id)
        return SendToModel(protocol.response_cancel(response.response_id))

    # The reply watchdog: a reply owed and a silent model is asked once more, then the call ends.
    def _expect_reply(self, now: float) -> list[TurnAction]:
        if self.first_utterance_protected or self._closing is not None:
            return []  # the greeting and the closing line have deadlines of their own
        deadline = now + self.settings.model_reply_timeout_s
        if self._reply_watch is None:
            self._reply_watch = ReplyWatch(deadline)
        else:
            self._reply_watch.deadline = deadline
        return []

    def _model_progressed(self, now: float) -> None:
        if self._reply_watch is not None:
            self._reply_watch.deadline = now + self.settings.model_reply_timeout_s

    def _check_reply_deadline(self, now: float) -> list[TurnAction]:
        watch = self._reply_watch
        if watch is None or now < watch.deadline:
            return []
        timeout_s = self.settings.model_reply_timeout_s
        if watch.asked_again:
            self._reply_watch = None
            return [
                Log("MODEL", "no reply from the model after asking again; ending the call",
                    {"timeout_s": timeout_s}, "error"),
                RecordEvent("error", {"code": "model_unresponsive", "timeout_s": timeout_s}),
                HangUp("model_unresponsive"),
            ]
        watch.asked_again, watch.deadline = True, now + timeout_s
        # A stalled response would refuse the new one: it is stopped, cancelled and truncated like a barge-in.
        stalled, silencing = self._silence_audible()
        actions: list[TurnAction] = [Log("MODEL", "no sign of a reply from the model; asking again", {
            "timeout_s": timeout_s, "stalled": ",".join(response.response_id for response in stalled)}, "warning")]
        actions.extend(silencing)
        return actions + [SendToModel(protocol.response_create())]

    # A lost model link, reopened: the new session hears the call so far, as the caller heard it.
    def _on_model_reconnected(self, now: float) -> list[TurnAction]:
        answering = any(response.active for response in self._responses.values())
        actions: list[TurnAction] = []
        for response in self._responses.values():
            response.active = False  # the lost session ends none of them
            for item in response.items.values():
                if not item.settled and item.played_ms > 0 and item.transcript:
                    actions.append(self._record_item(item))
                item.settled = True  # the new session never had it: nothing to truncate or delete
        # What the lost session generated and the caller has not heard yet is not in the history: it stops here.
        actions.extend(self._silence_audible()[1])
        actions += [
            Log("MODEL", "model session reopened; the call so far restored", {"turns": len(self._heard)}, "warning"),
            RecordEvent("model_reconnected", {"turns_restored": len(self._heard)}),
            SendToModel(protocol.session_update(self.settings)),
        ]
        actions.extend(SendToModel(_history_item(role, text)) for role, text in self._heard)
        if self._closing is not None:
            if self._closing.phase is not ClosingPhase.OVER:
                self._closing.phase = ClosingPhase.QUIETING  # silenced above with the rest: asked again of the new session
        elif self.first_utterance_protected:
            actions.extend(self._request_first_response(now))  # the greeting, cut short, is asked of the new session
        elif answering or self._reply_watch is not None:
            actions.append(SendToModel(protocol.response_create()))
            actions.extend(self._expect_reply(now))
        return actions

    # Closing: the bot's last words, said to the end, then the hang-up.
    def _on_close_call(self, reason: str) -> list[TurnAction]:
        if self._closing is not None:
            return []
        self._closing = Closing(reason)
        self._reply_watch = None  # the closing line has its own deadline
        actions: list[TurnAction] = [
            Log("CALL", "closing the call: the closing line, then the hang-up", {"reason": reason}),
            RecordEvent("closing", {"reason": reason}),
        ]
        if self.first_utterance_protected:
            actions.extend(self._release_protection("the call is closing"))
        return actions + self._silence_audible()[1]

    def _on_response_created_while_closing(self, response: ResponseState) -> list[TurnAction]:
        closing = self._closing
        if closing.phase is ClosingPhase.REQUESTED:
            closing.phase, closing.response_id = ClosingPhase.PLAYING, response.response_id
            return []
        # Not ours (the model's own turn detection answered the caller): the closing line comes instead.
        response.silenced = True
        return [self._cancel(response)]

    def _advance_closing(self) -> list[TurnAction]:
        """The step run after every event: request the closing line once the model is quiet; hang up once it
        has been heard to the end (or the model ended it without audio)."""
        closing = self._closing
        if closing is None:
            return []
        if closing.phase is ClosingPhase.QUIETING and not any(r.active for r in self._responses.values()):
            closing.phase = ClosingPhase.REQUESTED
            create = protocol.response_create(self.settings.closing_instructions)
            create["event_id"] = CLOSING_LINE_EVENT_ID
            return [SendToModel(create)]
        line = self._responses.get(closing.response_id)
        if closing.phase is ClosingPhase.PLAYING and (line is None or not line.audible):
            closing.phase = ClosingPhase.OVER
            return [Log("CALL", "closing line heard, hanging up", {"reason": closing.reason}), HangUp(closing.reason)]
        return []

    def _forget_unheard(self, response: ResponseState) -> list[TurnAction]:
        """The model forgets what the caller did not hear: truncated where partly heard, deleted where not at all."""
        actions: list[TurnAction] = []
        for item in response.items.values():
            if item.settled:
                continue  # recorded already, or never the current session's
            if item.played_ms == 0:
                actions.append(SendToModel(protocol.item_delete(item.item_id)))
                item.settled = True
            elif item.played_ms < item.generated_ms:
                actions.append(SendToModel(protocol.item_truncate(item.item_id, item.played_ms)))
        return actions

    def _on_caller_transcript(self, item_id: str, transcript: str, now: float) -> list[TurnAction]:
        committed_at_s = self._caller_turns_committed.pop(item_id, now)
        if not transcript.strip():
            return []  # a cough or a line noise the model took for a turn: nothing was said
        self._heard.append(("user", transcript))
        return [RecordTranscript("user", transcript, committed_at_s, False, None)]

    def _on_dtmf(self, digit: str, now: float) -> list[TurnAction]:
        said = f"The caller pressed the phone key {digit}."
        self._heard.append(("user", said))
        actions: list[TurnAction] = [
            Log("DTMF", "caller pressed a key", {"digit": digit}),
            RecordEvent("dtmf", {"digit": digit}),
            SendToModel(protocol.user_text_item(said)),
        ]
        if self._closing is None and not any(response.active for response in self._responses.values()):
            actions.append(SendToModel(protocol.response_create()))  # a key press deserves an answer
            actions.extend(self._expect_reply(now))
        return actions

    def _on_call_ending(self, reason: str) -> list[TurnAction]:
        actions: list[TurnAction] = [Log("CALL", "call ending", {"reason": reason})]
        for response in self._responses.values():
            actions.extend(self._record_item(item) for item in response.items.values()
                           if not item.settled and item.played_ms > 0 and item.transcript)
        return actions
