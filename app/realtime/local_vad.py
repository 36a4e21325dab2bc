"""The local model's server VAD: frame energy against a threshold, timed on the model's audio clock."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dsp.level import rms

SAMPLE_RATE_HZ = 8000
FRAME_MS = 20
SAMPLES_PER_FRAME = SAMPLE_RATE_HZ * FRAME_MS // 1000
THRESHOLD_FLOOR_DBFS = -70.0
THRESHOLD_SPAN_DB = 40.0


def rms_threshold(threshold: float) -> float:
    """The int16-scale RMS a frame needs to count as speech, for a server_vad `threshold` in 0..1.

    The threshold maps linearly in decibels onto -70..-30 dBFS: 0.0 hears line noise, 0.5 (OpenAI's
    default) is -50 dBFS (RMS ~104), 0.82 is -37.2 dBFS (RMS ~452), 1.0 needs a loud -30 dBFS (RMS ~1036).
    """
    return 32768.0 * 10.0 ** ((THRESHOLD_FLOOR_DBFS + THRESHOLD_SPAN_DB * threshold) / 20.0)


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    onset_ms: int
    """Start of the first loud frame, on the audio clock (prefix padding not yet applied)."""


@dataclass(frozen=True, slots=True)
class SpeechStopped:
    audio_end_ms: int
    """End of the frame that completed the silence, so it includes the silence duration, as OpenAI's does."""


class EnergyVad:
    """Speech starts on one frame at or above the RMS threshold and stops after `silence_duration_ms` below it.

    Audio arrives in chunks of any length; a partial frame waits for the next chunk. The clock counts
    every sample fed since the session began, so event times are audio positions, not wall time.
    """

    def __init__(self, threshold: float, silence_duration_ms: int) -> None:
        self.rms_threshold = rms_threshold(threshold)
        self.silence_duration_ms = silence_duration_ms
        self.clock_ms = 0
        self.speaking = False
        self._silence_ms = 0
        self._pending_samples = np.zeros(0, dtype=np.int16)

    def reconfigure(self, threshold: float, silence_duration_ms: int) -> None:
        """Apply new parameters from a session.update without losing the clock or an utterance in progress."""
        self.rms_threshold = rms_threshold(threshold)
        self.silence_duration_ms = silence_duration_ms

    def reset(self) -> None:
        """Forget an utterance in progress (the buffer was committed or cleared); the clock keeps running."""
        self.speaking = False
        self._silence_ms = 0

    def feed(self, samples: np.ndarray) -> list[SpeechStarted | SpeechStopped]:
        """Advance the clock over 8 kHz int16 samples; returns the speech boundaries crossed, in order."""
        samples = np.concatenate((self._pending_samples, samples)) if self._pending_samples.size else samples
        whole_frames = len(samples) // SAMPLES_PER_FRAME
        self._pending_samples = samples[whole_frames * SAMPLES_PER_FRAME :].copy()
        boundaries: list[SpeechStarted | SpeechStopped] = []
        for index in range(whole_frames):
            frame = samples[index * SAMPLES_PER_FRAME : (index + 1) * SAMPLES_PER_FRAME]
            boundary = self._frame(rms(frame) >= self.rms_threshold)
            if boundary is not None:
                boundaries.append(boundary)
        return boundaries

    def _frame(self, loud: bool) -> SpeechStarted | SpeechStopped | None:
        frame_start_ms = self.clock_ms
        self.clock_ms += FRAME_MS
        if not self.speaking:
            if loud:
                self.speaking = True
                self._silence_ms = 0
                return SpeechStarted(onset_ms=frame_start_ms)
            return None
        self._silence_ms = 0 if loud else self._silence_ms + FRAME_MS
        if self._silence_ms >= self.silence_duration_ms:
            self.speaking = False
            self._silence_ms = 0
            return SpeechStopped(audio_end_ms=self.clock_ms)
        return None
