"""Voice activity on 20 ms frames (webrtcvad) and the debounced barge-in onset detector."""

from __future__ import annotations

import numpy as np
import webrtcvad

VAD_FRAME_MS = (10, 20, 30)
VAD_SAMPLE_RATES_HZ = (8000, 16000, 32000, 48000)


class FrameVad:
    """webrtcvad on one frame of int16 samples; aggressiveness 0 (lenient) to 3 (strict)."""

    def __init__(self, aggressiveness: int, sample_rate_hz: int = 8000) -> None:
        if aggressiveness not in (0, 1, 2, 3):
            raise ValueError(f"VAD aggressiveness must be 0, 1, 2 or 3, got {aggressiveness!r}")
        if sample_rate_hz not in VAD_SAMPLE_RATES_HZ:
            raise ValueError(f"VAD sample rate must be one of {VAD_SAMPLE_RATES_HZ} Hz, got {sample_rate_hz!r}")
        self.sample_rate_hz = sample_rate_hz
        self.frame_lengths = {sample_rate_hz * ms // 1000 for ms in VAD_FRAME_MS}
        self._vad = webrtcvad.Vad(aggressiveness)

    def is_voiced(self, frame: np.ndarray) -> bool:
        """True when webrtcvad hears voice in this 10, 20 or 30 ms frame."""
        if len(frame) not in self.frame_lengths:
            raise ValueError(
                f"a VAD frame must be 10, 20 or 30 ms ({sorted(self.frame_lengths)} samples "
                f"at {self.sample_rate_hz} Hz), got {len(frame)} samples"
            )
        return self._vad.is_speech(np.asarray(frame, dtype="<i2").tobytes(), self.sample_rate_hz)


class VoiceOnset:
    """Fires once per run of `voice_frames` consecutive qualifying frames, then rests for `debounce_ms`.

    Up to `masked_frames_bridged` masked frames inside a run (voice the echo gate could not tell
    from echo) are passed over: they neither count nor break the run. Frames seen while resting do
    not count: after the rest a fresh run is needed.
    """

    def __init__(self, voice_frames: int, debounce_ms: float, masked_frames_bridged: int = 0) -> None:
        if voice_frames < 1:
            raise ValueError(f"voice_frames must be at least 1, got {voice_frames!r}")
        self.voice_frames = voice_frames
        self.debounce_ms = debounce_ms
        self.masked_frames_bridged = masked_frames_bridged
        self.run_frames = 0
        self.run_masked_frames = 0
        self.last_onset_ms: float | None = None

    def update(self, voiced: bool, now_ms: float, masked: bool = False) -> bool:
        """Feed one frame's verdict; True exactly on the frame that completes a run."""
        resting = self.last_onset_ms is not None and now_ms - self.last_onset_ms < self.debounce_ms
        if not resting and not voiced and masked and self.run_frames and self.run_masked_frames < self.masked_frames_bridged:
            self.run_masked_frames += 1
            return False
        if resting or not voiced:
            self.run_frames = self.run_masked_frames = 0
            return False
        self.run_frames += 1
        if self.run_frames < self.voice_frames:
            return False
        self.run_frames = self.run_masked_frames = 0
        self.last_onset_ms = now_ms
        return True
