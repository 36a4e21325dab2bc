"""Signal levels on the int16 scale, and a streaming noise-floor tracker."""

from __future__ import annotations

import math

import numpy as np

INT16_FULL_SCALE = 32768.0
SILENCE_DBFS = -120.0
"""What dbfs() reports for digital silence, instead of minus infinity."""


def energy_ratio(db: float) -> float:
    """The energy (power) ratio of `db` decibels."""
    return 10.0 ** (db / 10.0)


def rms(frame: np.ndarray) -> float:
    """Root mean square of int16 samples, on the int16 scale (0..32768)."""
    samples = np.asarray(frame, dtype=np.float64)
    if samples.size == 0:
        return 0.0
    return math.sqrt(float(np.dot(samples, samples)) / samples.size)


def dbfs(frame: np.ndarray) -> float:
    """RMS level relative to int16 full scale, in dB; a full-scale square wave is 0 dBFS."""
    level = rms(frame)
    if level <= 0.0:
        return SILENCE_DBFS
    return max(SILENCE_DBFS, 20.0 * math.log10(level / INT16_FULL_SCALE))


class NoiseFloorTracker:
    """Follows the background level: drops at once to a quieter frame, rises slowly through speech."""

    def __init__(self, rise_db_per_s: float = 3.0, frame_ms: float = 20.0, min_floor_rms: float = 1.0) -> None:
        self.rise_factor = 10.0 ** (rise_db_per_s * frame_ms / 1000.0 / 20.0)
        self.min_floor_rms = min_floor_rms
        self.floor_rms: float | None = None

    def update(self, frame_rms: float) -> float:
        """Feed one frame's RMS; returns the current noise floor (RMS, int16 scale)."""
        if self.floor_rms is None:
            self.floor_rms = max(frame_rms, self.min_floor_rms)
        else:
            self.floor_rms = max(min(frame_rms, self.floor_rms * self.rise_factor), self.min_floor_rms)
        return self.floor_rms
