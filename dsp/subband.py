"""Sub-band double-talk detection: the caller's voice shows in the bands the bot's echo leaves free.

A broadband energy rule cannot see a caller who starts quieter than the echo, but two voices
rarely fill the same bands at the same moment. Once the broadband estimator has found the echo
delay, the near frame and the far-end 20 ms that echoes into it are compared band by band: each
band's echo gain is measured like the echo return loss, and a frame shows the caller when enough
bands clearly exceed the echo predicted for them.
"""

from __future__ import annotations

import numpy as np
import scipy.fft

try:
    # The compiled transform behind scipy.fft: on 160 samples its dispatch layer costs more than the transform.
    from scipy.fft._pocketfft.pypocketfft import r2c as _pocketfft_r2c
except ImportError:
    _pocketfft_r2c = None

FRAME_SAMPLES = 160
BLOCK_SAMPLES = 40
BAND_BINS = 5
BAND_COUNT = 16
"""Sixteen 250 Hz bands from 50 Hz to 4 kHz (bin 0, the DC, is left out)."""

_WINDOW = np.hanning(FRAME_SAMPLES)
_BAND_FIRST_BINS = np.arange(1, 1 + BAND_COUNT * BAND_BINS, BAND_BINS)
# rfft bins viewed as interleaved (real, imaginary) floats: band b sums floats from 2 * its first bin.
_BAND_FLOAT_STARTS = 2 * _BAND_FIRST_BINS
# The same for a near and a far spectrum side by side: each bin is (near re, near im, far re, far im).
_PAIR_BAND_FLOAT_STARTS = 4 * _BAND_FIRST_BINS
_BIN_BANDS = np.repeat(np.arange(BAND_COUNT), BAND_BINS)
WHITE_NOISE_BAND_POWER = float(np.dot(_WINDOW, _WINDOW)) * BAND_BINS
"""Expected band power of white noise of unit mean square: each bin carries the window's energy."""


def real_spectra(frames: np.ndarray, axis: int) -> np.ndarray:
    """rfft along `axis` (of length 160) of a 2-D float64 array."""
    if _pocketfft_r2c is None:
        return scipy.fft.rfft(frames, axis=axis)
    return _pocketfft_r2c(frames, (axis,), True, 0, None, 1)


def band_powers(windowed_frames: np.ndarray) -> np.ndarray:
    """Power in each band of each row of `windowed_frames` (rows of 160 samples, already Hann-windowed)."""
    return np.add.reduceat(np.square(real_spectra(windowed_frames, 1).view(np.float64)), _BAND_FLOAT_STARTS, axis=1)


class SubbandEchoModel:
    """Recent near and far samples, each band's echo gain at the adopted delay, and the double-talk rule.

    Band gains are measured apart from the broadband gain: a coloured echo path returns some bands
    far louder than the broadband return loss says.
    """

    def __init__(
        self,
        history_samples: int,
        band_margin_db: float = 6.0,
        min_caller_bands: int = 3,
        quantization_loss_db: float = 30.0,
        min_active_frames: int = 5,
        measure_every_adoptions: int = 5,
    ) -> None:
        self.history_samples = history_samples
        self.band_margin = 10.0 ** (band_margin_db / 10.0)
        self.min_caller_bands = min_caller_bands
        self.quantization_fraction = 10.0 ** (-quantization_loss_db / 10.0)
        self.min_active_frames = min_active_frames
        self.measure_every_adoptions = measure_every_adoptions
        self.adoptions_since_measured = 0
        # Columns [0, samples_stored) hold near (row 0) and far (row 1) samples, oldest first; trimmed in bulk.
        self.samples = np.zeros((2, 2 * history_samples))
        self.samples_stored = history_samples
        # Every 160-sample window of the far row, as a view: the one aligned with the echo is a plain index.
        self.far_windows = np.lib.stride_tricks.sliding_window_view(self.samples[1], FRAME_SAMPLES)
        # Near and far windowed frames as two columns: their spectra come out bin by bin, side by side.
        self.windowed = np.zeros((FRAME_SAMPLES, 2))
        self.delay_samples: int | None = None
        self.band_gains: np.ndarray | None = None
        # Per float of the side-by-side spectra: +1 on the near, minus the band's margin times gain on the far.
        self.excess_weights: np.ndarray | None = None

    def push(self, near_and_far: np.ndarray) -> None:
        """Store one frame: `near_and_far` is a (2, 160) float array, near then far."""
        stored = self.samples_stored
        if stored + FRAME_SAMPLES > self.samples.shape[1]:
            self.samples[:, : self.history_samples] = self.samples[:, stored - self.history_samples:stored]
            stored = self.history_samples
        self.samples[:, stored:stored + FRAME_SAMPLES] = near_and_far
        self.samples_stored = stored + FRAME_SAMPLES

    def follow_echo_path(self, delay_blocks: int, window_frames: int) -> None:
        """Take an adopted delay; measure the band gains when it moves, else every few adoptions (they cost).

        At an unchanged delay a new measurement may only raise a band's gain, as with the broadband one.
        """
        delay_samples = delay_blocks * BLOCK_SAMPLES
        self.adoptions_since_measured += 1
        if delay_samples == self.delay_samples and self.adoptions_since_measured < self.measure_every_adoptions:
            return
        band_gains = self._measure_band_gains(delay_samples, window_frames)
        if band_gains is None:
            return
        if delay_samples == self.delay_samples and self.band_gains is not None:
            band_gains = np.maximum(band_gains, self.band_gains)
        self.band_gains = band_gains
        self.delay_samples = delay_samples
        self.excess_weights = np.ones((FRAME_SAMPLES // 2 + 1, 4))
        self.excess_weights[1:, 2:] = -self.band_margin * band_gains[_BIN_BANDS, None]
        self.adoptions_since_measured = 0

    def shows_caller(self, near_frame: np.ndarray, noise_energy: float, near_energy: float) -> bool:
        """True when enough bands of `near_frame`, the newest one pushed, clearly exceed their echo plus noise."""
        return self.caller_band_count(near_frame, noise_energy, near_energy) >= self.min_caller_bands

    def caller_band_count(self, near_frame: np.ndarray, noise_energy: float, near_energy: float) -> int:
        """How many bands of `near_frame`, the newest one pushed, clearly exceed their echo plus noise.

        0 until the band gains are measured. `noise_energy` and `near_energy` are mean squares.
        """
        if self.excess_weights is None:
            return 0
        windowed = self.windowed
        np.multiply(near_frame, _WINDOW, out=windowed[:, 0])
        echoed_far = self.far_windows[self.samples_stored - self.delay_samples - FRAME_SAMPLES]
        np.multiply(echoed_far, _WINDOW, out=windowed[:, 1])
        # Squared spectra weighted so that one sum per band gives near power minus the echo threshold.
        weighted = np.square(real_spectra(windowed, 0).view(np.float64))
        weighted *= self.excess_weights
        excess_powers = np.add.reduceat(weighted.ravel(), _PAIR_BAND_FLOAT_STARTS)
        # Line noise and the codec's quantisation noise, both close to white.
        noise_energy += self.quantization_fraction * near_energy
        noise_power = self.band_margin * WHITE_NOISE_BAND_POWER * noise_energy
        return np.count_nonzero(excess_powers > noise_power)

    def _measure_band_gains(self, delay_samples: int, window_frames: int) -> np.ndarray | None:
        """Each band's echo gain: its median near/far power ratio over the frames where the far end fills it."""
        span = window_frames * FRAME_SAMPLES
        end = self.samples_stored
        near = self.samples[0, end - span:end]
        far = self.samples[1, end - delay_samples - span:end - delay_samples]
        frames = np.concatenate((near, far)).reshape(2 * window_frames, FRAME_SAMPLES) * _WINDOW
        near_bands, far_bands = np.split(band_powers(frames), 2)
        active = far_bands > 0.05 * far_bands.max(axis=0)
        ratios = np.where(active, near_bands / np.maximum(far_bands, 1e-12), np.inf)
        ratios.sort(axis=0)
        active_counts = active.sum(axis=0)
        band_gains = ratios[active_counts // 2, np.arange(BAND_COUNT)]
        measured = active_counts >= self.min_active_frames
        if not measured.any():
            return None
        # A band the far end hardly used gets the loudest measured gain: unknown means assume the worst.
        return np.where(measured, band_gains, band_gains[measured].max())
