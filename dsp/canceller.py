"""Spectral echo cancellation and double talk on what it leaves: the caller shows through the bot's echo.

An energy rule cannot see a caller who starts quieter than the echo. Once the echo path's delay is
measured, it is refined to the sample by cross-correlation, and each Hann-windowed 20 ms frame of
the line is compared with the far-end frame that echoes into it, bin by bin: a one-tap filter per
bin (the cross-spectrum over the far end's power, averaged over frames judged echo only) estimates
the echo path's response. The echo is predicted by convolving the far end with that response's
taps around the delay, in time: a product of windowed spectra cannot follow the hybrid's dispersion
across a frame's edge, and leaves some 10 dB more echo. The residual is what the bot did not say; a
telephone hybrid is close to linear, so within half a second the residual echo sits 20-30 dB under
the echo. The caller is heard when the residual clearly exceeds the residual echo measured for
that line, broadband or in enough bands.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import scipy.fft

from dsp.history import RowHistory
from dsp.level import energy_ratio

try:
    # The compiled transform behind scipy.fft: on 160 samples its dispatch layer costs more than the transform.
    from scipy.fft._pocketfft.pypocketfft import r2c as _pocketfft_r2c
except ImportError:
    _pocketfft_r2c = None

FRAME_SAMPLES = 160
BIN_COUNT = FRAME_SAMPLES // 2 + 1
BAND_BINS = 5
BAND_COUNT = 16
"""Sixteen 250 Hz bands from 50 Hz to 4 kHz (bin 0, the DC, is left out)."""

_WINDOW = np.hanning(FRAME_SAMPLES)
_BAND_FIRST_BINS = np.arange(1, 1 + BAND_COUNT * BAND_BINS, BAND_BINS)
MAX_BIN_GAIN = 2.0
ECHO_TAPS = 64
"""The echo path's impulse response kept, 8 ms: a hybrid's dispersion dies out well within it."""
ECHO_LEAD_TAPS = 16
"""Of them, those before the delay: a bandpass's group delay places the delay up to 2 ms late."""
WHITE_NOISE_BIN_POWER = float(np.dot(_WINDOW, _WINDOW))
"""Expected power in one bin of white noise of unit mean square: the window's energy."""
WHITE_NOISE_BAND_POWER = WHITE_NOISE_BIN_POWER * BAND_BINS


def real_spectra(frames: np.ndarray, axis: int, out: np.ndarray | None = None) -> np.ndarray:
    """rfft along `axis` (of length 160) of a 2-D float64 array, into `out` when given."""
    if _pocketfft_r2c is None:
        spectra = scipy.fft.rfft(frames, axis=axis)
        if out is None:
            return spectra
        out[...] = spectra
        return out
    return _pocketfft_r2c(frames, (axis,), True, 0, out, 1)


def band_sums(bin_powers: np.ndarray) -> np.ndarray:
    """Sums of bins 1-80 in 16 bands of 5, along the last axis."""
    return np.add.reduceat(bin_powers, _BAND_FIRST_BINS, axis=-1)


def refine_delay(near: np.ndarray, far: np.ndarray, search_samples: int) -> int:
    """How many samples (within +-search) `near` lags behind `far`, two equal-length stretches of signal.

    Generalised cross-correlation with phase transform: whitening the cross-spectrum sharpens the
    peak, where a plain correlation of voiced speech has a ridge at every pitch period.
    """
    size = 1 << int(2 * len(near) - 1).bit_length()
    cross = scipy.fft.rfft(near, size) * np.conj(scipy.fft.rfft(far, size))
    correlation = scipy.fft.irfft(cross / np.maximum(np.abs(cross), 1e-12), size)
    lags = np.concatenate((correlation[size - search_samples:], correlation[: search_samples + 1]))
    return int(np.argmax(lags)) - search_samples


class SpectralEchoCanceller:
    """Recent near and far samples; the echo's delay to the sample; per-bin echo filter; the residual's echo gains."""

    def __init__(
        self,
        history_samples: int,
        band_margin_db: float = 6.0,
        residual_margin_db: float = 8.0,
        min_caller_bands: int = 3,
        quantization_loss_db: float = 30.0,
        min_active_frames: int = 10,
        smoothing: float = 0.95,
        refine_span_samples: int = 4000,
        refine_search_samples: int = 48,
        measure_every_frames: int = 20,
        measured_frames: int = 50,
        filter_every_frames: int = 4,
        regularisation_db: float = -40.0,
        gain_quantile: float = 0.9,
        measurements_held: int = 3,
        warmup_frames: int = 5,
        lead_samples: int = 3,
        fit_db: float = 10.0,
        min_fitting_frames: int = 3,
    ) -> None:
        self.band_margin = energy_ratio(band_margin_db)
        self.residual_margin = energy_ratio(residual_margin_db)
        self.min_caller_bands = min_caller_bands
        self.fit_ratio = energy_ratio(fit_db)
        self.min_fitting_frames = min_fitting_frames
        self.quantization_fraction = energy_ratio(-quantization_loss_db)
        self.min_active_frames = min_active_frames
        self.smoothing = smoothing
        self.gain_quantile = gain_quantile
        self.regularisation = energy_ratio(regularisation_db)
        self.refine_span_samples = refine_span_samples
        self.refine_search_samples = refine_search_samples
        self.measure_every_frames = measure_every_frames
        self.filter_every_frames = filter_every_frames
        # Near (row 0) and far (row 1) samples.
        self.samples = RowHistory(2, history_samples)
        # The frame just observed: windowed near, residual and far rows, their spectra and their bins' powers.
        self.windowed = np.zeros((3, FRAME_SAMPLES))
        self.observed = np.zeros((3, BIN_COUNT), dtype=np.complex128)
        self.observed_powers = np.zeros((3, BIN_COUNT))
        self.near_frame = np.zeros(FRAME_SAMPLES)
        # Band powers of near, residual and far for the last `measured_frames` learned frames, a ring:
        # rows [0, filled) hold frames, the next goes to row `next`.
        self.learned_bands = np.zeros((measured_frames, 3, BAND_COUNT))
        self.learned_bands_filled = 0
        self.learned_bands_next = 0
        self.delay_samples: int | None = None
        self.coarse_delay_samples: int | None = None
        # Row 0: the smoothed near-far cross-spectrum; row 1: the far end's smoothed power.
        self.statistics = np.zeros((2, BIN_COUNT), dtype=np.complex128)
        self.echo_filter = np.zeros(BIN_COUNT, dtype=np.complex128)
        self.echo_taps = np.zeros(ECHO_TAPS)
        self.residual_gain: float | None = None
        self.band_gains: np.ndarray | None = None
        self.frames_until_measure = measure_every_frames
        self.measured_gains: deque[np.ndarray] = deque(maxlen=measurements_held)
        self.warmup_frames = warmup_frames
        self.lead_samples = lead_samples
        self.learned_frames = 0
        self._spectra: np.ndarray | None = None
        self._bands: np.ndarray | None = None

    @property
    def ready(self) -> bool:
        return self.band_gains is not None

    def push(self, near_and_far: np.ndarray) -> None:
        """Store one frame: `near_and_far` is a (2, 160) float array, near then far."""
        self.samples.append(near_and_far)
        self._spectra = None
        self._bands = None

    def follow_echo_path(self, delay_samples: int) -> None:
        """Take an adopted delay (to the block); once it moves further than the search, refine it to the
        sample and start the filter afresh.
        """
        if self.coarse_delay_samples is None or abs(delay_samples - self.coarse_delay_samples) > self.refine_search_samples:
            self.coarse_delay_samples = delay_samples
            samples, end = self.samples.values, self.samples.end
            span = min(self.refine_span_samples, end - delay_samples)
            near = samples[0, end - span:end]
            far = samples[1, end - span - delay_samples:end - delay_samples]
            # The far frame starts a little early: the line's dispersion carries some of what came before it.
            self.delay_samples = max(0, delay_samples + refine_delay(near, far, self.refine_search_samples)
                                     - self.lead_samples)
            self.reset()

    def follow_moved_echo(self, search_samples: int, span_samples: int) -> int | None:
        """After a far-end silence, where the echo of the last `span_samples` moved to within `search_samples`
        of the delay (GCC-PHAT), if the filter cancels `min_fitting_frames` of those frames there.

        Network jitter moves the whole echo, not its shape: the filter is kept at the new delay, which is
        returned (None: nothing fits, and nothing changes).
        """
        samples, end, delay = self.samples.values, self.samples.end, self.delay_samples
        span = min(span_samples, end - delay - search_samples) // FRAME_SAMPLES * FRAME_SAMPLES
        if span < self.min_fitting_frames * FRAME_SAMPLES:
            return None
        echo_delay = delay + refine_delay(samples[0, end - span:end], samples[1, end - span - delay:end - delay],
                                          search_samples)
        # The filter was learned on far frames starting `lead_samples` early: the new delay keeps that lead.
        moved = max(0, echo_delay - self.lead_samples)
        if moved == delay or self._fitting_frames(moved, span // FRAME_SAMPLES) < self.min_fitting_frames:
            return None
        self.delay_samples = moved
        self.coarse_delay_samples = echo_delay
        return echo_delay

    def _fitting_frames(self, delay_samples: int, count: int) -> int:
        """Of the last `count` frames, how many the filter removes most of (by `fit_db`) at `delay_samples`."""
        samples, end, span = self.samples.values, self.samples.end, count * FRAME_SAMPLES
        near = samples[0, end - span:end]
        frames = np.vstack((near, near - self._predicted_echo(delay_samples, span))).reshape(2 * count, FRAME_SAMPLES)
        powers = band_sums(np.abs(real_spectra(frames * _WINDOW, 1)) ** 2).sum(axis=1)
        near_powers, residual_powers = powers[:count], powers[count:]
        return int(np.count_nonzero(residual_powers * self.fit_ratio < near_powers))

    def reset(self) -> None:
        """Forget the echo filter and the residual's gains: the line is not what they were learned on."""
        self.suspend()
        self.statistics[:] = 0.0
        self.echo_filter[:] = 0.0
        self.echo_taps[:] = 0.0
        self.learned_frames = 0

    def measure(self) -> None:
        """The residual's echo gains, broadband and per band, over the frames learned lately.

        Each is the `gain_quantile` of the residual/far ratios over those frames where the far end
        plays: the residual's echo varies far more from frame to frame than the echo does. A band the
        far end hardly used gets the loudest raw gain measured: unknown means assume the worst.
        """
        self.frames_until_measure = self.measure_every_frames
        if self.learned_bands_filled < self.min_active_frames:
            return
        near_bands, residual_bands, far_bands = self.learned_bands[: self.learned_bands_filled].transpose(1, 0, 2)
        # One pass over every column: the raw bands, the residual's bands and the residual broadband.
        gains, measured = _ratio_quantiles(
            np.hstack((near_bands, residual_bands, residual_bands.sum(axis=1, keepdims=True))),
            np.hstack((far_bands, far_bands, far_bands.sum(axis=1, keepdims=True))),
            self.gain_quantile, self.min_active_frames)
        if not measured[:BAND_COUNT].any():
            return
        # A band the far end hardly used may echo as loud as the loudest band does before cancelling.
        loudest_raw = float(gains[:BAND_COUNT][measured[:BAND_COUNT]].max())
        gains = np.where(measured[BAND_COUNT:], gains[BAND_COUNT:], loudest_raw)
        # The loudest of the last few measurements: a second's quantile alone is sometimes too kind.
        self.measured_gains.append(gains)
        held = np.max(self.measured_gains, axis=0)
        self.band_gains = held[:BAND_COUNT]
        self.residual_gain = float(held[BAND_COUNT])

    def observe(self, near_frame: np.ndarray) -> None:
        """Transform `near_frame`, the newest one pushed, the far-end frame that echoes into it, and the residual."""
        windowed = self.windowed
        self.near_frame[:] = near_frame
        np.multiply(near_frame, _WINDOW, out=windowed[0])
        start = self.samples.end - self.delay_samples - FRAME_SAMPLES
        np.multiply(self.samples.values[1, start:start + FRAME_SAMPLES], _WINDOW, out=windowed[2])
        self._window_residual()
        self._spectra = real_spectra(windowed, 1, out=self.observed)
        self._bands = None

    def _window_residual(self) -> None:
        """The frame just observed less the echo the taps predict from the far end, windowed, into row 1."""
        np.subtract(self.near_frame, self._predicted_echo(self.delay_samples, FRAME_SAMPLES), out=self.windowed[1])
        self.windowed[1] *= _WINDOW

    def _predicted_echo(self, delay_samples: int, length: int) -> np.ndarray:
        """The echo the taps predict in the last `length` near samples, from the far end `delay_samples` earlier."""
        samples, end = self.samples.values, self.samples.end
        start = end - delay_samples - length - (ECHO_TAPS - ECHO_LEAD_TAPS) + 1
        stop = end - delay_samples + ECHO_LEAD_TAPS
        far = samples[1, start:min(stop, end)]
        if stop > end:
            # At a delay shorter than the lead, the taps before it would reach far audio not yet played.
            far = np.concatenate((far, np.zeros(stop - end)))
        return np.convolve(far, self.echo_taps, "valid")

    def suspend(self) -> None:
        """Stop judging until the residual's gains are measured again (they no longer fit the line)."""
        self.band_gains = None
        self.residual_gain = None
        self.measured_gains.clear()
        self.learned_bands_filled = self.learned_bands_next = 0

    def shows_caller(self, noise_energy: float, near_energy: float) -> bool:
        """True when the residual of the frame just observed clearly exceeds its echo plus noise.

        Broadband by `residual_margin_db`, or in `min_caller_bands` bands by `band_margin_db` each.
        `noise_energy` and `near_energy` are mean squares. Only once `ready`.
        """
        _, residual_bands, far_bands = self._frame_bands()
        # Line noise and the codec's quantisation noise, both close to white.
        noise_band_power = WHITE_NOISE_BAND_POWER * (noise_energy + self.quantization_fraction * near_energy)
        # Shaped by band too: the far end's spectrum moves the broadband ratio more than the residual echo.
        residual_echo = max(self.residual_gain * float(far_bands.sum()), float(np.dot(self.band_gains, far_bands)))
        if float(residual_bands.sum()) > self.residual_margin * (residual_echo + BAND_COUNT * noise_band_power):
            return True
        excess = residual_bands > self.band_margin * (self.band_gains * far_bands + noise_band_power)
        return int(np.count_nonzero(excess)) >= self.min_caller_bands

    def cancels_most(self) -> bool:
        """True when the filter removes most of the frame just observed (by `fit_db`): its delay fits the line."""
        near_bands, residual_bands, _ = self._frame_bands()
        return float(residual_bands.sum()) * self.fit_ratio < float(near_bands.sum())

    def learn(self) -> None:
        """The frame just observed was echo only: fold its spectra into the per-bin echo filter.

        Once the filter is in use, the frame's bands join those the residual's gains are measured on.
        """
        spectra = self._spectra
        statistics = self.statistics
        statistics *= self.smoothing
        statistics += (1.0 - self.smoothing) * spectra[::2] * spectra[2].conj()
        self.learned_frames += 1
        learned_beyond_warmup = self.learned_frames - self.warmup_frames
        if learned_beyond_warmup < 0:
            return
        if learned_beyond_warmup % self.filter_every_frames == 0:
            # The filter follows slowly (the smoothing spans some twenty frames): no need to divide every frame.
            far_power = statistics[1].real
            # Where the far end hardly plays, the ratio is noise over nothing: those bins are left uncancelled.
            np.divide(statistics[0], far_power + (self.regularisation * float(far_power.sum()) / BIN_COUNT + 1e-3),
                      out=self.echo_filter)
            # No hybrid returns a bin 6 dB louder than it was played: a larger tap is noise, not echo.
            magnitude = np.abs(self.echo_filter)
            self.echo_filter *= np.minimum(1.0, MAX_BIN_GAIN / np.maximum(magnitude, 1e-12))
            # The response's taps around the delay: further out is the estimate's noise, not the hybrid.
            response = scipy.fft.irfft(self.echo_filter, FRAME_SAMPLES)
            self.echo_taps[:] = np.concatenate((response[-ECHO_LEAD_TAPS:], response[:ECHO_TAPS - ECHO_LEAD_TAPS]))
            self._window_residual()
            real_spectra(self.windowed[1:2], 1, out=self.observed[1:2])
            self._bands = None
        if learned_beyond_warmup == 0:
            self.frames_until_measure = self.measure_every_frames
        ring = self.learned_bands
        ring[self.learned_bands_next] = self._frame_bands()
        self.learned_bands_next = (self.learned_bands_next + 1) % len(ring)
        self.learned_bands_filled = min(self.learned_bands_filled + 1, len(ring))
        self.frames_until_measure -= 1
        if self.frames_until_measure <= 0:
            self.measure()

    def _frame_bands(self) -> np.ndarray:
        """Band powers of the frame just observed: near, residual and far rows, computed once per frame."""
        if self._bands is None:
            spectra, powers = self._spectra, self.observed_powers
            np.multiply(spectra.real, spectra.real, out=powers)
            powers += spectra.imag**2
            self._bands = band_sums(powers)
        return self._bands


def _ratio_quantiles(
    residual_bands: np.ndarray, far_bands: np.ndarray, quantile: float, min_active_frames: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Per column, a quantile of the residual/far ratio over the rows where the far end fills that
    column, and whether at least `min_active_frames` such rows measured it."""
    active = far_bands > 0.05 * far_bands.max(axis=0)
    ratios = np.where(active, residual_bands / np.maximum(far_bands, 1e-12), np.inf)
    ratios.sort(axis=0)
    active_counts = active.sum(axis=0)
    gains = ratios[(quantile * np.maximum(active_counts - 1, 0)).astype(np.int64), np.arange(ratios.shape[1])]
    return gains, active_counts >= min_active_frames
