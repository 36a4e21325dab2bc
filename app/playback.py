"""Outbound playback: model audio to the carrier at a bounded lead, one cancel scope per response, through
a bounded outbox in which a `clear` overtakes whatever audio is still unsent."""

from __future__ import annotations

from collections import deque

import numpy as np
import trio

from app.carriers import twilio
from app.turn_events import PlayAudio
from dsp.g711 import ulaw_decode

FRAME_SAMPLES = 160
STOPPED_RESPONSES_REMEMBERED = 16
# Playback paces audio out in real time, so audio unsent for this long means the carrier stopped reading.
CARRIER_OUTBOX_LIMIT_MS = 5000


class PlayoutReference:
    """What the caller is hearing now: audio sent to the carrier, consumed one frame per inbound frame.

    Inbound frames arrive in real time, as the carrier plays ours, so popping one frame per inbound
    frame tracks the carrier's playout; the echo gate absorbs the remaining offset as echo delay.
    """

    def __init__(self) -> None:
        self._pending = np.zeros(0, dtype=np.int16)

    def extend(self, pcm: np.ndarray) -> None:
        self._pending = np.concatenate((self._pending, pcm))

    def pop_frame(self) -> np.ndarray:
        frame = self._pending[:FRAME_SAMPLES]
        self._pending = self._pending[FRAME_SAMPLES:]
        if len(frame) < FRAME_SAMPLES:
            frame = np.concatenate((frame, np.zeros(FRAME_SAMPLES - len(frame), dtype=np.int16)))
        return frame

    def clear(self) -> None:
        self._pending = np.zeros(0, dtype=np.int16)


class CarrierNotReading(Exception):
    """More audio waits unsent for the carrier than CARRIER_OUTBOX_LIMIT_MS: its socket has stopped draining."""


class CarrierOutbox:
    """What goes to the carrier, in order, except that a `clear` overtakes every message still unsent.

    Audio enters the playout reference when it leaves the outbox for the socket, not when it is queued,
    so the echo gate compares the line with what the caller can actually be hearing.
    """

    def __init__(self, stream_sid: str, reference: PlayoutReference) -> None:
        self._stream_sid = stream_sid
        self._reference = reference
        self._unsent: deque[tuple[str, np.ndarray | None]] = deque()
        self._unsent_samples = 0
        self._clear_due = False
        self._changed = trio.Event()

    def put_audio(self, audio: bytes, mark: str) -> None:
        """Queue a chunk and the mark that follows it; raises CarrierNotReading past the bound."""
        if self._unsent_samples + len(audio) > CARRIER_OUTBOX_LIMIT_MS * 8:
            raise CarrierNotReading(f"{self._unsent_samples // 8} ms of audio unsent: the carrier stopped reading")
        self._unsent.append((twilio.media(self._stream_sid, audio), ulaw_decode(np.frombuffer(audio, dtype=np.uint8))))
        self._unsent.append((twilio.mark(self._stream_sid, mark), None))
        self._unsent_samples += len(audio)
        self._changed.set()

    def clear(self) -> None:
        """The carrier's buffer is to be emptied: so is ours, and the caller hears nothing of it any more."""
        self._unsent.clear()
        self._unsent_samples = 0
        self._reference.clear()
        self._clear_due = True
        self._changed.set()

    async def next_message(self) -> str:
        while not (self._clear_due or self._unsent):
            self._changed = trio.Event()
            await self._changed.wait()
        if self._clear_due:
            self._clear_due = False
            return twilio.clear(self._stream_sid)
        text, pcm = self._unsent.popleft()
        if pcm is not None:
            self._unsent_samples -= len(pcm)
            self._reference.extend(pcm)
        return text


class Playback:
    """Sends each response's audio, then its mark, keeping at most `lead_ms` buffered ahead at the carrier.

    Each response plays inside its own cancel scope; `stop()` cancels it, so no later frame of that
    response leaves. Each chunk enters the outbox with its mark in one step, so cancellation never
    separates them.
    """

    def __init__(
        self,
        chunks: trio.MemoryReceiveChannel[PlayAudio],
        outbox: CarrierOutbox,
        lead_ms: int,
    ) -> None:
        self._chunks = chunks
        self._outbox = outbox
        self._lead_s = lead_ms / 1000
        # A stopped response's chunks are all queued before its stop, so a few recent ids suffice.
        self._stopped: deque[str] = deque(maxlen=STOPPED_RESPONSES_REMEMBERED)
        self._current: tuple[str, trio.CancelScope] | None = None
        self._carrier_buffer_ends_at = 0.0

    def stop(self, response_id: str) -> None:
        """Barge-in: nothing more of this response goes out, including chunks still queued."""
        self._stopped.append(response_id)
        if self._current is not None and self._current[0] == response_id:
            self._current[1].cancel()

    def carrier_cleared(self) -> None:
        """A `clear` goes to the carrier ahead of anything unsent; its buffer is empty from now."""
        self._carrier_buffer_ends_at = trio.current_time()
        self._outbox.clear()

    async def run(self) -> None:
        chunk = await self._next_live_chunk()
        while True:
            with trio.CancelScope() as scope:
                self._current = (chunk.response_id, scope)
                chunk = await self._play_response(chunk)
            self._current = None
            if scope.cancelled_caught:
                chunk = await self._next_live_chunk()

    async def _next_live_chunk(self) -> PlayAudio:
        while True:
            chunk = await self._chunks.receive()
            if chunk.response_id not in self._stopped:
                return chunk

    async def _play_response(self, chunk: PlayAudio) -> PlayAudio:
        """Play chunks of one response; return the first chunk of the next one."""
        response_id = chunk.response_id
        while chunk.response_id == response_id:
            await trio.sleep_until(self._carrier_buffer_ends_at - self._lead_s)
            self._outbox.put_audio(chunk.audio, chunk.mark)
            now = trio.current_time()
            self._carrier_buffer_ends_at = max(now, self._carrier_buffer_ends_at) + len(chunk.audio) / 8000
            chunk = await self._next_live_chunk()
        return chunk
