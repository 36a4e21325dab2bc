"""What the call path submits to the storage writer: plain frozen values, no database types."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


class _CallRecordMixin:
    @property
    def log_id(self) -> str:
        """What the `call=` field of a log line about this record names."""
        return self.call_sid  # type: ignore[attr-defined]


@dataclass(frozen=True)
class CallStarted(_CallRecordMixin):
    call_sid: str
    stream_sid: str
    from_number: str
    to_number: str
    business_id: int | None
    started_at: datetime


@dataclass(frozen=True)
class CallEventRecord(_CallRecordMixin):
    """One moment of a call; kinds: first_utterance_end, barge_in {"talk_over_ms"}, error, dtmf."""

    call_sid: str
    kind: str
    at: datetime
    detail: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TranscriptTurnRecord(_CallRecordMixin):
    """One spoken turn; a truncated bot turn was cut by barge-in after `heard_ms` of audio."""

    call_sid: str
    role: str
    text: str
    started_at: datetime
    truncated: bool = False
    heard_ms: int | None = None


@dataclass(frozen=True)
class CallEnded(_CallRecordMixin):
    call_sid: str
    ended_at: datetime
    end_reason: str


@dataclass(frozen=True)
class WhatsappStatusRecord:
    """A delivery callback from the WhatsApp webhook, for the recipient that has this message id."""

    message_id: str
    status: str
    at: datetime
    error_code: int | None = None
    error_title: str = ""
    log_id: str = "-"


CallRecord = CallStarted | CallEventRecord | TranscriptTurnRecord | CallEnded | WhatsappStatusRecord
