"""The vocabulary of the turn-taking state machine: events in, actions out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union


# Events: what happened on the call, as the state machine needs to know it.
@dataclass(frozen=True, slots=True)
class CallStarted:
    pass


@dataclass(frozen=True, slots=True)
class ResponseCreated:
    response_id: str


@dataclass(frozen=True, slots=True)
class OutputItemAdded:
    response_id: str
    item_id: str


@dataclass(frozen=True, slots=True)
class AudioDelta:
    response_id: str
    item_id: str
    audio: bytes


@dataclass(frozen=True, slots=True)
class AudioDone:
    response_id: str


@dataclass(frozen=True, slots=True)
class TranscriptDone:
    response_id: str
    item_id: str
    transcript: str


@dataclass(frozen=True, slots=True)
class ResponseDone:
    response_id: str
    status: str


@dataclass(frozen=True, slots=True)
class ModelError:
    code: str
    message: str
    event_id: str = ""


@dataclass(frozen=True, slots=True)
class MarkPlayed:
    name: str


@dataclass(frozen=True, slots=True)
class VoiceOnset:
    """The local VAD heard the caller: `voiced_ms` of consecutive voice that passed the echo gate."""

    voiced_ms: int


@dataclass(frozen=True, slots=True)
class CallerTurnCommitted:
    """The model's turn detection took what the caller said as a finished turn (`item_id`): a reply is owed."""

    item_id: str


@dataclass(frozen=True, slots=True)
class CallerTranscript:
    """The model's transcription of the caller's turn `item_id`."""

    item_id: str
    transcript: str


@dataclass(frozen=True, slots=True)
class DtmfPressed:
    digit: str


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed; lets deadlines fire without any other event."""


@dataclass(frozen=True, slots=True)
class CloseCall:
    """End the call politely: silence the bot, have it say its closing line, then hang up with `reason`."""

    reason: str


@dataclass(frozen=True, slots=True)
class ModelReconnected:
    """The model link was lost and a new session opened: it knows nothing of the call yet."""


@dataclass(frozen=True, slots=True)
class CallEnding:
    reason: str


TurnEvent = Union[
    CallStarted, ResponseCreated, OutputItemAdded, AudioDelta, AudioDone, TranscriptDone, ResponseDone, ModelError,
    MarkPlayed, VoiceOnset, CallerTurnCommitted, CallerTranscript, DtmfPressed, Tick, CloseCall, ModelReconnected,
    CallEnding,
]


# Actions: what the call's tasks must carry out, in order.
@dataclass(frozen=True, slots=True)
class SendToModel:
    event: dict


@dataclass(frozen=True, slots=True)
class PlayAudio:
    """Send `audio` to the carrier, then a mark named `mark` to learn when it has been heard."""

    response_id: str
    audio: bytes
    mark: str


@dataclass(frozen=True, slots=True)
class StopPlayback:
    response_id: str


@dataclass(frozen=True, slots=True)
class ClearCarrier:
    pass


@dataclass(frozen=True, slots=True)
class Log:
    tag: str
    message: str
    fields: dict = field(default_factory=dict)
    level: str = "info"


@dataclass(frozen=True, slots=True)
class RecordEvent:
    kind: str
    detail: dict


@dataclass(frozen=True, slots=True)
class RecordTranscript:
    """A turn of the conversation; `started_at_s` is on the clock `now` is passed on."""

    role: str
    text: str
    started_at_s: float
    truncated: bool
    heard_ms: int | None


@dataclass(frozen=True, slots=True)
class HangUp:
    reason: str


TurnAction = Union[SendToModel, PlayAudio, StopPlayback, ClearCarrier, Log, RecordEvent, RecordTranscript, HangUp]
