"""Streaming polyphase resampling between the telephone and model sample rates."""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy.signal import firwin

SUPPORTED_RATES_HZ = (8000, 16000, 24000)
KAISER_BETA = 5.0
TAPS_PER_PHASE_PER_RATIO = 20
"""Half-length of the anti-aliasing filter, in input samples, per unit of the larger rate ratio (as scipy's resample_poly)."""


class StreamingResampler:
    """Resamples int16 audio chunk by chunk; the output is the same however the input is split.

    The filter is designed once per object. Output lags the input by the filter's group delay
    (2.5 ms); the history carried between chunks is what makes the split irrelevant.
    """

    def __init__(self, from_hz: int, to_hz: int) -> None:
        for rate_hz in (from_hz, to_hz):
            if rate_hz not in SUPPORTED_RATES_HZ:
                raise ValueError(f"sample rates must be one of {SUPPORTED_RATES_HZ} Hz, got {rate_hz!r}")
        common_hz = math.gcd(from_hz, to_hz)
        self.from_hz = from_hz
        self.to_hz = to_hz
        self.up = to_hz // common_hz
        self.down = from_hz // common_hz
        if self.up == self.down:
            taps_per_phase, taps = 1, np.ones(1)
        else:
            taps_per_phase = 2 * TAPS_PER_PHASE_PER_RATIO * max(self.up, self.down) // self.up + 1
            cutoff = 1.0 / max(self.up, self.down)
            taps = firwin(taps_per_phase * self.up, cutoff, window=("kaiser", KAISER_BETA)) * self.up
        # Row p holds the taps that meet input samples at phase p, newest sample last.
        self.phase_taps = taps.reshape(taps_per_phase, self.up).T[:, ::-1].copy()
        self.history = np.zeros(taps_per_phase - 1)
        self.next_position = 0
        """Where the next output falls, in upsampled steps from the start of the next chunk."""

    def process(self, samples: np.ndarray) -> np.ndarray:
        """Resample the next chunk of int16 samples; returns the int16 output it completes."""
        chunk = np.asarray(samples, dtype=np.int16)
        if len(chunk) == 0:
            return np.zeros(0, dtype=np.int16)
        taps_per_phase = self.phase_taps.shape[1]
        buffered = np.concatenate((self.history, chunk))
        chunk_positions = len(chunk) * self.up
        output_count = max(0, -(-(chunk_positions - self.next_position) // self.down))
        positions = self.next_position + self.down * np.arange(output_count)
        windows = sliding_window_view(buffered, taps_per_phase)[positions // self.up]
        filtered = np.einsum("ij,ij->i", self.phase_taps[positions % self.up], windows)
        self.next_position += output_count * self.down - chunk_positions
        self.history = buffered[len(buffered) - (taps_per_phase - 1):]
        return np.clip(np.rint(filtered), -32768, 32767).astype(np.int16)
