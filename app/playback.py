"""Outbound playback: model audio to the carrier at a bounded lead, one cancel scope per response."""

from __future__ import annotations

from collections import deque

import numpy as np
import trio

from app.carriers import twilio
from app.turn_events import PlayAudio
from dsp.g711 import ulaw_decode

FRAME_SAMPLES = 160
STOPPED_RESPONSES_REMEMBERED = 16


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


class Playback:
    """Sends each response's audio, then its mark, keeping at most `lead_ms` buffered ahead at the carrier.

    Each response plays inside its own cancel scope; `stop()` cancels it, so no later frame of that
    response leaves. Carrier writes go through `carrier_out` as media+mark pairs sent without a
    checkpoint between them, so cancellation never splits a pair or interrupts a socket write.
    """

    def __init__(
        self,
        stream_sid: str,
        chunks: trio.MemoryReceiveChannel[PlayAudio],
        carrier_out: trio.MemorySendChannel[str],
        reference: PlayoutReference,
        lead_ms: int,
    ) -> None:
        self._stream_sid = stream_sid
        self._chunks = chunks
        self._carrier_out = carrier_out
        self._reference = reference
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
        self._carrier_buffer_ends_at = trio.current_time()
        self._reference.clear()

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
            self._carrier_out.send_nowait(twilio.media(self._stream_sid, chunk.audio))
            self._carrier_out.send_nowait(twilio.mark(self._stream_sid, chunk.mark))
            self._reference.extend(ulaw_decode(np.frombuffer(chunk.audio, dtype=np.uint8)))
            now = trio.current_time()
            self._carrier_buffer_ends_at = max(now, self._carrier_buffer_ends_at) + len(chunk.audio) / 8000
            chunk = await self._next_live_chunk()
        return chunk
