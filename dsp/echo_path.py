"""A simulated telephone echo path and line, for the simulator, the evaluation and the tests."""

from __future__ import annotations

import numpy as np
from scipy.signal import butter, sosfilt

HYBRID_BAND_HZ = (250.0, 3300.0)
"""The echo through a 2-4 wire hybrid is band-limited and phase-shifted, not a pure delay."""


def simulate_echo(
    far: np.ndarray,
    delay_ms: float,
    echo_return_loss_db: float,
    sample_rate_hz: int = 8000,
    hybrid_band_hz: tuple[float, float] = HYBRID_BAND_HZ,
    hybrid_order: int = 2,
) -> np.ndarray:
    """The echo of `far` as heard back on the line: filtered, delayed, `echo_return_loss_db` quieter (float64)."""
    far_samples = np.asarray(far, dtype=np.float64)
    hybrid = butter(hybrid_order, hybrid_band_hz, btype="bandpass", fs=sample_rate_hz, output="sos")
    filtered = sosfilt(hybrid, far_samples)
    far_energy = float(np.dot(far_samples, far_samples))
    filtered_energy = float(np.dot(filtered, filtered))
    if filtered_energy <= 0.0:
        return np.zeros_like(far_samples)
    # Scale so the echo's energy sits exactly echo_return_loss_db below the far end's.
    gain = np.sqrt(far_energy / filtered_energy * 10.0 ** (-echo_return_loss_db / 10.0))
    delay_samples = int(round(delay_ms * sample_rate_hz / 1000.0))
    echo = np.zeros_like(far_samples)
    echo[delay_samples:] = gain * filtered[: len(far_samples) - delay_samples]
    return echo


def line_noise(sample_count: int, noise_rms: float, rng: np.random.Generator) -> np.ndarray:
    """White line noise at `noise_rms` (int16 scale), float64."""
    return rng.normal(0.0, noise_rms, sample_count)


def to_int16(signal: np.ndarray) -> np.ndarray:
    """Round and clip a float signal to int16, as the line's codec would."""
    return np.clip(np.rint(signal), -32768, 32767).astype(np.int16)


def active_speech_rms(speech: np.ndarray, frame_samples: int = 160, active_range_db: float = 35.0) -> float:
    """RMS over the 20 ms frames within `active_range_db` of the loudest: a speech level that pauses do not lower."""
    frame_count = len(speech) // frame_samples
    if frame_count == 0:
        raise ValueError(f"need at least one frame of {frame_samples} samples to measure a speech level, got {len(speech)}")
    frames = np.asarray(speech[: frame_count * frame_samples], dtype=np.float64).reshape(frame_count, frame_samples)
    energies = np.mean(frames**2, axis=1)
    if energies.max() <= 0.0:
        raise ValueError("the clip is silent: it has no speech level")
    active = energies >= energies.max() * 10.0 ** (-active_range_db / 10.0)
    return float(np.sqrt(energies[active].mean()))
