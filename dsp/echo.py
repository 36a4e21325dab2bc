"""Echo gates: decide whether an inbound frame is the caller's voice or the bot's own echo.

`RmsEchoGate` is the seed's rule. `ReferenceEchoGate` compares the inbound frame with what the
line would carry without the caller: the echo of the audio played to the caller, plus the line's
noise floor. Before any echo is measured, `dsp.echo_bound` bounds the echo at every delay by what
the line has shown while the bot spoke (a line without echo is known as such within a second).
The echo delay is found by cross-correlating energy envelopes; from then on `dsp.canceller`
predicts the echo bin by bin and judges the caller on what is left, so a caller who starts quieter
than the echo is still heard.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from dsp.canceller import SpectralEchoCanceller
from dsp.echo_bound import EchoBound
from dsp.history import RowHistory
from dsp.level import NoiseFloorTracker, energy_ratio

FRAME_SAMPLES = 160
BLOCK_SAMPLES = 40
BLOCKS_PER_FRAME = FRAME_SAMPLES // BLOCK_SAMPLES
BLOCK_MS = 5.0
GATE_MODES = ("reference", "rms")
ENVELOPE_FLOOR_ENERGY = 100.0
"""Added to block energies before taking logs: 20 dB below the quietest line noise worth tracking."""
FLAT_ENVELOPE_POWER = 1e-6
"""A log envelope varying less than this (digital silence, a steady tone) has nothing to correlate;
speech varies by whole units of log energy, so its power is in the hundreds."""

# The reference gate's tuning, measured by scripts/vad_eval.py over lines from no echo to 6 dB.
MAX_DELAY_BLOCKS = round(300.0 / BLOCK_MS)
"""Echo delays searched: G.168's 300 ms covers the network and the carrier's buffers."""
DEFAULT_ECHO_RETURN_LOSS_DB = 6.0
"""G.168's worst-case hybrid, assumed until the line shows better."""
DEFAULT_ECHO_GAIN = energy_ratio(-DEFAULT_ECHO_RETURN_LOSS_DB)
MARGIN = energy_ratio(2.5)
"""How far above the predicted echo and noise a frame must be to count as the caller."""
CLEAR_MARGIN = energy_ratio(10.0)
"""Far enough above the echo at a confirmed delay to pass without the spectral test."""
NOISE_MARGIN = energy_ratio(6.0)
"""Above the line's noise floor: below it a frame is never the caller."""
SPREAD_BLOCKS = round(5.0 / BLOCK_MS)
"""Estimates this close in delay agree."""
JITTER_BLOCKS = round(50.0 / BLOCK_MS)
"""How far network jitter may move the delay between talkspurts."""
FAR_GAP_BLOCKS = round(300.0 / BLOCK_MS)
"""A far-end silence this long may have moved the delay."""
WINDOW_BLOCKS = round(1000.0 / BLOCK_MS)
"""The envelopes correlated for one estimate."""
WINDOW_FRAMES = WINDOW_BLOCKS // BLOCKS_PER_FRAME
SHORTEST_WINDOW_BLOCKS = round(300.0 / BLOCK_MS)
"""The least of a talkspurt an estimate is made on."""
ESTIMATE_EVERY_FRAMES = 50
"""Estimate once a second on a settled line..."""
SEARCH_EVERY_FRAMES = 5
"""...and every 100 ms while the path is unknown or unconfirmed."""
FOLLOW_EVERY_FRAMES = 2
"""While unconfirmed, look every 40 ms for where the echo moved (the canceller's GCC-PHAT is the costly part)."""
MIN_CORRELATION = 0.6
"""A weaker envelope correlation places no delay."""
DOUBLE_TALK_FRAMES = 0.2 * WINDOW_FRAMES
"""More of the window accepted than this: the caller talked, and estimates are not believed."""
SUSPECT_FRAMES = 0.6 * WINDOW_FRAMES
"""More than this: a line that changed is likelier than a caller talking that long."""
CONFIRM_FRAMES = 3
"""Frames the canceller must keep cancelling to confirm a delay after a far-end silence."""
QUIET_LINE_GAIN = energy_ratio(-30.0)
"""A bound below this at every delay: a line with no echo to search for."""
DELAY_STEPS = MAX_DELAY_BLOCKS + JITTER_BLOCKS + 1
HISTORY_BLOCKS = WINDOW_BLOCKS + MAX_DELAY_BLOCKS + JITTER_BLOCKS + BLOCKS_PER_FRAME

_BLOCK_STARTS = np.arange(0, 2 * FRAME_SAMPLES, BLOCK_SAMPLES)
_FRAME_OF_BLOCKS = np.full(BLOCKS_PER_FRAME, 1.0 / BLOCKS_PER_FRAME)


def block_energies(near_and_far: np.ndarray) -> np.ndarray:
    """Mean square of each 5 ms block of a (2, 160) near and far frame pair: a (2, 4) array, near then far."""
    if near_and_far.shape != (2, FRAME_SAMPLES):
        raise ValueError(f"expected a near and a far 20 ms frame, shape (2, {FRAME_SAMPLES}), got {near_and_far.shape}")
    return (np.add.reduceat(np.square(near_and_far).ravel(), _BLOCK_STARTS) * (1.0 / BLOCK_SAMPLES)).reshape(2, 4)


class _EnergyGate:
    """Shared entry point: both gates decide on a near and far frame pair and its per-block energies."""

    def accepts(self, near: np.ndarray, far: np.ndarray, bot_audible: bool) -> bool:
        """True when the inbound 20 ms frame `near` counts as the caller's voice; `far` is what played meanwhile."""
        near_and_far = np.array((near, far), dtype=np.float64)
        return self.accepts_frames(near_and_far, block_energies(near_and_far), bot_audible)

    def accepts_frames(self, near_and_far: np.ndarray, energies: np.ndarray, bot_audible: bool) -> bool:
        """The same, given the frames' (2, 4) block energies from `block_energies`."""
        raise NotImplementedError


class RmsEchoGate(_EnergyGate):
    """While the bot is audible, accept only frames at least `min_rms` loud; otherwise accept all."""

    def __init__(self, min_rms: float) -> None:
        self.min_rms = min_rms
        self.min_energy = min_rms**2

    def accepts_frames(self, near_and_far: np.ndarray, energies: np.ndarray, bot_audible: bool) -> bool:
        """The seed's rule on the frame's mean square; the far end is not used."""
        return not bot_audible or float(energies[0].sum()) * (1.0 / BLOCKS_PER_FRAME) >= self.min_energy


def estimate_echo_path(
    near_envelope: np.ndarray,
    far_envelope: np.ndarray,
    min_correlation: float,
    far_floor_energy: float = ENVELOPE_FLOOR_ENERGY,
) -> tuple[int, float] | None:
    """Echo delay (in blocks) and echo gain (energy ratio) from energy envelopes, or None if unsure.

    `far_envelope` is longer than `near_envelope` by the largest delay searched; both end at the
    same instant. `far_floor_energy` is added to the far envelope before its log, as
    ENVELOPE_FLOOR_ENERGY is to the near one. Returns None when the far end was too quiet or the best correlation is weak
    (e.g. the caller talks over the echo).
    """
    window_blocks = len(near_envelope)
    max_lag_blocks = len(far_envelope) - window_blocks
    # Log envelopes: a loud burst on the line (a click, a cough) must not outweigh seconds of echo.
    near_amplitude = np.log(near_envelope + ENVELOPE_FLOOR_ENERGY)
    far_amplitude = np.log(far_envelope + far_floor_energy)
    near_centered = near_amplitude - near_amplitude.sum() / window_blocks
    near_power = float(np.dot(near_centered, near_centered))
    # Entry j of each per-window array is the far end delayed by (max_lag_blocks - j) blocks.
    sums = np.cumsum(np.concatenate(([0.0], far_amplitude)))
    sums_of_squares = np.cumsum(np.concatenate(([0.0], far_amplitude**2)))
    window_sums = sums[window_blocks:] - sums[:-window_blocks]
    window_powers = sums_of_squares[window_blocks:] - sums_of_squares[:-window_blocks] - window_sums**2 / window_blocks
    if near_power <= FLAT_ENVELOPE_POWER or window_powers.max() <= FLAT_ENVELOPE_POWER:
        return None
    # np.correlate, not a matrix product: it stays off the BLAS thread pool on the per-call path.
    covariances = np.correlate(far_amplitude, near_centered, "valid")
    correlations = covariances / np.sqrt(np.maximum(window_powers, 1e-12) * near_power)
    best_row = int(np.argmax(correlations))
    if correlations[best_row] < min_correlation:
        return None
    aligned_far = far_envelope[best_row:best_row + window_blocks]
    far_active = aligned_far > 0.05 * aligned_far.max()
    if np.count_nonzero(far_active) < 0.2 * window_blocks:
        return None
    ratios = np.sort(near_envelope[far_active] / aligned_far[far_active])
    # The upper quartile: robust to the caller's bursts, and steadier than the median on a coloured path,
    # which returns a different share of each sound; a sort is far cheaper than np.percentile here.
    # Floored: a line of digital silence measures no echo at all, and gains are divided by.
    echo_gain = max(float(ratios[3 * len(ratios) // 4]), 1e-12)
    return max_lag_blocks - best_row, echo_gain


@dataclass(frozen=True, slots=True)
class EchoPath:
    """A measured echo path: its delay and energy gain; `confirmed` is False after the far end fell
    silent (network jitter moves the delay from one response to the next) until the canceller is seen
    still cancelling at it or an estimate places it again."""

    delay_blocks: int
    gain: float
    confirmed: bool = True
    fitting_frames: int = 0
    """While unconfirmed: the frames in a row the canceller has removed most of at this delay."""


class ReferenceEchoGate(_EnergyGate):
    """Accepts a frame only when it clearly exceeds the echo the far end can cause, and the line noise.

    With no path measured, the echo predicted at each delay is what `EchoBound` has learned the
    line may return there: G.168's worst case (6 dB return loss) until far-end audio has shown
    otherwise. Once an echo path is adopted (two estimates in a row agree on its delay, or one finds
    a far louder echo near the known delay while the caller seems to talk), a frame
    CLEAR_MARGIN above the echo at that delay is accepted at once; otherwise the spectral
    canceller decides on its residual. After a far-end silence the delay is unconfirmed (network
    jitter may have moved it): the echo is then predicted JITTER_BLOCKS either side of it, broadband,
    and the frame must also reach `min_rms`, until the canceller still cancels at the delay for
    CONFIRM_FRAMES frames, or its filter cancels the new response's echo at a delay moved within the
    jitter, or an estimate places it again. The reference
    tells more than `bot_audible`, which is unused.
    """

    def __init__(self, min_rms: float) -> None:
        self.min_energy = min_rms**2
        self.path: EchoPath | None = None
        self.last_estimate: tuple[int, float] | None = None
        self.noise_floor = NoiseFloorTracker()
        self.frames_until_estimate = ESTIMATE_EVERY_FRAMES
        # Block energies of near (row 0) and far (row 1).
        self.blocks = RowHistory(2, HISTORY_BLOCKS)
        self.blocks_since_far_audio = HISTORY_BLOCKS
        self.blocks_since_far_start = 0
        # Which of the window's frames the gate accepted: estimates over the caller's voice can mislead.
        self.accepted_frames: deque[bool] = deque([False] * WINDOW_FRAMES, maxlen=WINDOW_FRAMES)
        self.accepted_count = 0
        self.canceller = SpectralEchoCanceller(history_samples=(HISTORY_BLOCKS + BLOCKS_PER_FRAME) * BLOCK_SAMPLES)
        self.bound = EchoBound(DELAY_STEPS, prior_gain_db=-DEFAULT_ECHO_RETURN_LOSS_DB)

    @property
    def echo_return_loss_db(self) -> float | None:
        return None if self.path is None else -10.0 * math.log10(max(self.path.gain, 1e-12))

    @property
    def echo_delay_ms(self) -> float | None:
        return None if self.path is None else self.path.delay_blocks * BLOCK_MS

    def accepts_frames(self, near_and_far: np.ndarray, energies: np.ndarray, bot_audible: bool) -> bool:
        """True when the near frame is louder, by the margins, than the echo the far end can cause and the noise."""
        self._push(energies)
        self.canceller.push(near_and_far)
        near_energy = float(energies[0].sum()) * (1.0 / BLOCKS_PER_FRAME)
        noise_energy = self.noise_floor.update(math.sqrt(near_energy)) ** 2
        if self.blocks_since_far_audio >= DELAY_STEPS + BLOCKS_PER_FRAME:
            self._count(False)
            return near_energy > NOISE_MARGIN * noise_energy
        far_by_delay = self._far_frame_energies(DELAY_STEPS)[::-1]
        accepted = self._accepts(near_and_far[0], near_energy, noise_energy, far_by_delay)
        self._count(accepted)
        if self.path is None and not accepted:
            # The bound stands in for a measured path only: once one is adopted it is never consulted again.
            # The caller's voice is no evidence of echo.
            self.bound.learn(near_energy, noise_energy, far_by_delay)
        if self.accepted_count > SUSPECT_FRAMES and self.canceller.ready:
            # Most of a second taken for the caller: more likely the line changed than a caller this long.
            self.canceller.suspend()
        if accepted:
            # The caller over the bot, or an echo louder than we thought: look at the echo path soon.
            self.frames_until_estimate = min(self.frames_until_estimate, SEARCH_EVERY_FRAMES)
        return accepted

    def _accepts(self, near: np.ndarray, near_energy: float, noise_energy: float, far_by_delay: np.ndarray) -> bool:
        if near_energy <= NOISE_MARGIN * noise_energy:
            return False
        path = self.path
        if path is None:
            return near_energy > MARGIN * (self.bound.predicted_echo(far_by_delay) + noise_energy)
        canceller = self.canceller
        if not path.confirmed and canceller.ready:
            # The filter still removing most of each frame at the old delay: the delay has not moved.
            canceller.observe(near)
            fitting_frames = path.fitting_frames + 1 if canceller.cancels_most() else 0
            path = self.path = EchoPath(path.delay_blocks, path.gain, fitting_frames >= CONFIRM_FRAMES, fitting_frames)
            follow_now = self.blocks_since_far_start % (FOLLOW_EVERY_FRAMES * BLOCKS_PER_FRAME) == 0
            if not path.confirmed and fitting_frames == 0 and follow_now:
                # Or it moved with the whole echo, jitter's way: the filter, kept, cancels at the new delay.
                moved = canceller.follow_moved_echo(JITTER_BLOCKS * BLOCK_SAMPLES,
                                                    self.blocks_since_far_start * BLOCK_SAMPLES)
                if moved is not None:
                    path = self.path = EchoPath(round(moved / BLOCK_SAMPLES), path.gain)
        spread = SPREAD_BLOCKS if path.confirmed else JITTER_BLOCKS
        shortest = max(0, path.delay_blocks - spread)
        broadband_echo = path.gain * float(far_by_delay[shortest:path.delay_blocks + spread + 1].max())
        if not path.confirmed:
            return near_energy >= self.min_energy and near_energy > MARGIN * broadband_echo
        # Far above the echo broadband, the residual needs no look; the spectral test is the costly one.
        if near_energy > CLEAR_MARGIN * broadband_echo:
            return True
        canceller.observe(near)
        if canceller.ready:
            if canceller.shows_caller(noise_energy, near_energy):
                return True
        elif near_energy >= self.min_energy and near_energy > MARGIN * broadband_echo:
            return True
        canceller.learn()
        return False

    def _count(self, accepted: bool) -> None:
        self.accepted_count += accepted - self.accepted_frames[0]
        self.accepted_frames.append(accepted)

    def _far_frame_energies(self, count: int) -> np.ndarray:
        """Mean far-end energy of the 20 ms ending at each of the last `count` blocks, oldest first."""
        return self._frame_energies(1, count)

    def _frame_energies(self, row: int, count: int) -> np.ndarray:
        end = self.blocks.end
        return np.convolve(self.blocks.values[row, end - count - BLOCKS_PER_FRAME + 1:end], _FRAME_OF_BLOCKS, "valid")

    def _push(self, energies: np.ndarray) -> None:
        self.blocks.append(energies)
        if energies[1].max() > 0.0:
            if self.blocks_since_far_audio >= FAR_GAP_BLOCKS:
                self.blocks_since_far_start = 0
                if self.path is not None:
                    self.path = EchoPath(self.path.delay_blocks, self.path.gain, confirmed=False)
                    # Confirm the delay as soon as there is enough of the new talkspurt to place it.
                    self.frames_until_estimate = SHORTEST_WINDOW_BLOCKS // BLOCKS_PER_FRAME
            self.blocks_since_far_audio = 0
        else:
            self.blocks_since_far_audio += BLOCKS_PER_FRAME
        self.blocks_since_far_start += BLOCKS_PER_FRAME
        self.frames_until_estimate -= 1
        if self.frames_until_estimate <= 0:
            # Until a path is adopted and confirmed, estimate often: the gate is at its bluntest then.
            # A line the bound has shown to be quiet at every delay has no path to find meanwhile.
            path = self.path
            settled = path.confirmed if path is not None else self.bound.loudest_gain < QUIET_LINE_GAIN
            self.frames_until_estimate = ESTIMATE_EVERY_FRAMES if settled else SEARCH_EVERY_FRAMES
            if self.blocks_since_far_audio < WINDOW_BLOCKS and self.blocks_since_far_start >= SHORTEST_WINDOW_BLOCKS:
                self._estimate()

    def _estimate(self) -> None:
        # Only what followed the far end's last start: earlier audio may be the caller talking into a silence.
        window_blocks = min(WINDOW_BLOCKS, self.blocks_since_far_start)
        far_envelope = self._far_frame_energies(window_blocks + MAX_DELAY_BLOCKS)
        near_envelope = self._frame_energies(0, window_blocks)
        # Floor the far envelope where its echo would sink into the line noise, as the near one does:
        # otherwise the far end's quiet starts are seen before their echoes and bias the delay long.
        gain = DEFAULT_ECHO_GAIN if self.path is None else self.path.gain
        far_floor_energy = max(ENVELOPE_FLOOR_ENERGY, (self.noise_floor.floor_rms or 0.0) ** 2 / gain)
        estimate = estimate_echo_path(near_envelope, far_envelope, MIN_CORRELATION, far_floor_energy)
        previous, self.last_estimate = self.last_estimate, estimate
        if estimate is None:
            return
        delay_blocks, estimated_gain = estimate
        path = self.path
        if estimated_gain > 1.0:
            # Louder than the far end: the caller, not echo.
            self.last_estimate = None
            return
        near_known_delay = path is not None and abs(delay_blocks - path.delay_blocks) <= JITTER_BLOCKS
        agrees_with_previous = previous is not None and abs(delay_blocks - previous[0]) <= SPREAD_BLOCKS
        if path is not None and self.accepted_count > DOUBLE_TALK_FRAMES:
            # Much of the window passed as the caller: a louder echo near the delay we know (a speakerphone
            # switched on) is believed at once, over all the delays it may be at; nothing else is. With no
            # path yet, what passes may be echo the bound did not expect, so an echo placed twice still counts.
            if near_known_delay and estimated_gain > 2 * path.gain:
                self._adopt(EchoPath(path.delay_blocks, estimated_gain, confirmed=False))
            return
        if near_known_delay and not path.confirmed:
            self._adopt(EchoPath(delay_blocks, max(estimated_gain, path.gain)))
        elif agrees_with_previous:
            # A new delay only when two estimates in a row agree on it, with the louder echo of the two.
            self._adopt(EchoPath(delay_blocks, max(estimated_gain, previous[1])))

    def _adopt(self, path: EchoPath) -> None:
        previous = self.path
        if previous is not None and abs(path.delay_blocks - previous.delay_blocks) <= SPREAD_BLOCKS:
            # At the same delay the echo gain falls by at most 3 dB an estimate: a coloured echo path
            # returns a different share of each stretch of speech, and the estimate swings with it.
            path = dataclasses.replace(path, gain=max(path.gain, previous.gain / 2.0))
        # The echo rose by 6 dB or more: a new line, not the one the filter learned. (A fall is held to 3 dB
        # at the same delay, and a new delay starts the filter afresh as it follows the path.)
        if previous is not None and path.gain >= 4.0 * previous.gain:
            self.canceller.reset()
        self.path = path
        self.canceller.follow_echo_path(path.delay_blocks * BLOCK_SAMPLES)


def make_echo_gate(mode: str, min_rms: float) -> RmsEchoGate | ReferenceEchoGate:
    """The echo gate for `mode`: "reference" (echo-aware, the default) or "rms" (the seed's rule)."""
    if mode == "reference":
        return ReferenceEchoGate(min_rms=min_rms)
    if mode == "rms":
        return RmsEchoGate(min_rms=min_rms)
    raise ValueError(f"echo gate mode must be one of {GATE_MODES}, got {mode!r}")
