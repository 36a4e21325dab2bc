"""One response of the local model: a canned clip streamed as Realtime audio and transcript deltas."""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field

import numpy as np

from app.realtime.local_events import server_event
from dsp.g711 import ulaw_encode
from dsp.resample import StreamingResampler

CLIP_RATE_HZ = 8000
PCM_RATE_HZ = 24000
BYTES_PER_MS = {"audio/pcmu": CLIP_RATE_HZ // 1000, "audio/pcm": PCM_RATE_HZ // 1000 * 2}


@dataclass(frozen=True, eq=False)
class CannedAnswer:
    """A packaged clip and what it says, encoded once per output format and shared by every session."""

    samples: np.ndarray
    transcript: str
    _encoded: dict[str, bytes] = field(default_factory=dict, repr=False, compare=False)

    @property
    def duration_ms(self) -> int:
        return len(self.samples) * 1000 // CLIP_RATE_HZ

    def encoded(self, format_type: str) -> bytes:
        """The clip as `audio/pcmu` (8 kHz mu-law) or `audio/pcm` (24 kHz int16 little-endian) bytes."""
        if format_type not in self._encoded:
            if format_type == "audio/pcmu":
                self._encoded[format_type] = ulaw_encode(self.samples).tobytes()
            else:
                pcm = StreamingResampler(CLIP_RATE_HZ, PCM_RATE_HZ).process(self.samples)
                self._encoded[format_type] = pcm.astype("<i2").tobytes()
        return self._encoded[format_type]

    def transcript_heard(self, audio_ms: int) -> str:
        """The words spoken in the first `audio_ms` of the clip, assuming an even speaking rate."""
        words = re.findall(r"\s*\S+", self.transcript)
        heard_fraction = min(1.0, audio_ms / self.duration_ms) if self.duration_ms else 1.0
        return "".join(words[: int(len(words) * heard_fraction)])


class ResponseStream:
    """The events of one in-flight response, from `response.created` to `response.done`.

    The audio is cut into deltas of `delta_ms`; the transcript advances word by word in step with
    the audio sent so far. Nothing here sleeps: the caller paces `next_deltas()`.
    """

    def __init__(
        self,
        *,
        response_id: str,
        item_id: str,
        conversation_id: str,
        answer: CannedAnswer,
        output_format: dict,
        voice: object,
        delta_ms: int,
    ) -> None:
        self.response_id = response_id
        self.item_id = item_id
        self.conversation_id = conversation_id
        self.answer = answer
        self.output_format = output_format
        self.voice = voice
        self.audio = answer.encoded(output_format["type"])
        self.bytes_per_ms = BYTES_PER_MS[output_format["type"]]
        self.delta_bytes = delta_ms * self.bytes_per_ms
        self.sent_bytes = 0
        self.sent_transcript = ""

    @property
    def generated_ms(self) -> int:
        return self.sent_bytes // self.bytes_per_ms

    @property
    def audio_finished(self) -> bool:
        return self.sent_bytes >= len(self.audio)

    def item(self, status: str, transcript: str | None) -> dict:
        content = [] if transcript is None else [{"type": "output_audio", "transcript": transcript}]
        return {
            "id": self.item_id,
            "type": "message",
            "object": "realtime.item",
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def response(self, status: str, status_details: dict | None, output: list[dict]) -> dict:
        return {
            "object": "realtime.response",
            "id": self.response_id,
            "status": status,
            "status_details": status_details,
            "output": output,
            "conversation_id": self.conversation_id,
            "output_modalities": ["audio"],
            "max_output_tokens": "inf",
            "audio": {"output": {"format": self.output_format, "voice": self.voice}},
            "usage": None,
            "metadata": None,
        }

    def _indices(self) -> dict:
        return {"response_id": self.response_id, "item_id": self.item_id, "output_index": 0, "content_index": 0}

    def opening_events(self, previous_item_id: str | None) -> list[dict]:
        item = self.item("in_progress", None)
        return [
            server_event("response.created", response=self.response("in_progress", None, [])),
            server_event("response.output_item.added", response_id=self.response_id, output_index=0, item=item),
            server_event("conversation.item.added", previous_item_id=previous_item_id, item=item),
            server_event("response.content_part.added", **self._indices(), part={"type": "audio", "transcript": ""}),
        ]

    def next_deltas(self) -> list[dict]:
        """The next audio delta, and the transcript words it carries, if any."""
        chunk = self.audio[self.sent_bytes : self.sent_bytes + self.delta_bytes]
        self.sent_bytes += len(chunk)
        audio_delta = base64.b64encode(chunk).decode()
        events = [server_event("response.output_audio.delta", **self._indices(), delta=audio_delta)]
        # The last delta completes the transcript even if the clip is a little shorter than its text suggests.
        transcript = self.answer.transcript if self.audio_finished else self.answer.transcript_heard(self.generated_ms)
        if len(transcript) > len(self.sent_transcript):
            delta = transcript[len(self.sent_transcript) :]
            self.sent_transcript = transcript
            events.append(server_event("response.output_audio_transcript.delta", **self._indices(), delta=delta))
        return events

    def final_item(self, status: str) -> dict:
        return self.item(status, self.sent_transcript)

    def closing_events(self, status: str, reason: str | None, previous_item_id: str | None) -> list[dict]:
        """Close the audio, transcript, part and item, then `response.done` with `status`.

        A cancelled response closes like a finished one, but its item is `incomplete` and its
        transcript is what was streamed before the cancel.
        """
        item = self.final_item("completed" if status == "completed" else "incomplete")
        status_details = None if reason is None else {"type": status, "reason": reason}
        part = {"type": "audio", "transcript": self.sent_transcript}
        return [
            server_event("response.output_audio.done", **self._indices()),
            server_event("response.output_audio_transcript.done", **self._indices(), transcript=self.sent_transcript),
            server_event("response.content_part.done", **self._indices(), part=part),
            server_event("response.output_item.done", response_id=self.response_id, output_index=0, item=item),
            server_event("conversation.item.done", previous_item_id=previous_item_id, item=item),
            server_event("response.done", response=self.response(status, status_details, [item])),
        ]
