"""Echo gates: decide whether an inbound frame is the caller's voice or the bot's own echo.

`RmsEchoGate` is the seed's rule. `ReferenceEchoGate` compares the inbound energy with what the
line would carry without the caller: the echo predicted from the audio played to the caller, plus
the line's noise floor (Geigel-style double-talk detection on energies). It finds the echo delay
by cross-correlating energy envelopes, measures the echo return loss at that delay, and accepts a
frame only when its energy clearly exceeds both. Once the delay is known it judges band by band
instead (`dsp.subband`): a caller who starts quieter than the echo still shows in the bands the
echo leaves free.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from dsp.level import NoiseFloorTracker
from dsp.subband import SubbandEchoModel

FRAME_SAMPLES = 160
BLOCK_SAMPLES = 40
BLOCKS_PER_FRAME = FRAME_SAMPLES // BLOCK_SAMPLES
BLOCK_MS = 5.0
GATE_MODES = ("reference", "rms")
ENVELOPE_FLOOR_ENERGY = 100.0
"""Added to block energies before taking logs: 20 dB below the quietest line noise worth tracking."""

_BLOCK_STARTS = np.arange(0, 2 * FRAME_SAMPLES, BLOCK_SAMPLES)


def block_energies(near_and_far: np.ndarray) -> list[float]:
    """Mean square of each 5 ms block of a (2, 160) near and far frame pair: 4 near blocks, then 4 far."""
    if near_and_far.shape != (2, FRAME_SAMPLES):
        raise ValueError(f"expected a near and a far 20 ms frame, shape (2, {FRAME_SAMPLES}), got {near_and_far.shape}")
    return (np.add.reduceat(np.square(near_and_far).ravel(), _BLOCK_STARTS) * (1.0 / BLOCK_SAMPLES)).tolist()


class _EnergyGate:
    """Shared entry point: both gates decide on a near and far frame pair and its per-block energies."""

    def accepts(self, near: np.ndarray, far: np.ndarray, bot_audible: bool) -> bool:
        """True when the inbound 20 ms frame `near` counts as the caller's voice; `far` is what played meanwhile."""
        near_and_far = np.array((near, far), dtype=np.float64)
        energies = block_energies(near_and_far)
        return self.accepts_frames(near_and_far, energies[:BLOCKS_PER_FRAME], energies[BLOCKS_PER_FRAME:], bot_audible)

    def accepts_frames(
        self,
        near_and_far: np.ndarray,
        near_block_energies: Sequence[float],
        far_block_energies: Sequence[float],
        bot_audible: bool,
    ) -> bool:
        raise NotImplementedError


class RmsEchoGate(_EnergyGate):
    """While the bot is audible, accept only frames at least `min_rms` loud; otherwise accept all."""

    def __init__(self, min_rms: float = 200.0) -> None:
        self.min_rms = min_rms
        self.min_energy = min_rms**2

    def accepts_frames(
        self,
        near_and_far: np.ndarray,
        near_block_energies: Sequence[float],
        far_block_energies: Sequence[float],
        bot_audible: bool,
    ) -> bool:
        """The seed's rule on the frame's mean square; the far end is not used."""
        return not bot_audible or sum(near_block_energies) / BLOCKS_PER_FRAME >= self.min_energy


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
    if near_power <= 0.0 or window_powers.max() <= 0.0:
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
    # The median ratio: robust to the caller's bursts, and a sort is far cheaper than np.median here.
    echo_gain = float(ratios[len(ratios) // 2])
    return max_lag_blocks - best_row, echo_gain


def _frame_means(recent_blocks: Sequence[float], new_blocks: Sequence[float]) -> list[float]:
    """Mean energy over the 20 ms ending at each new block, given the 3 blocks just before them."""
    joined = [*recent_blocks, *new_blocks]
    total = joined[0] + joined[1] + joined[2]
    means = []
    for index, energy in enumerate(new_blocks):
        total += energy
        means.append(total / BLOCKS_PER_FRAME)
        total -= joined[index]
    return means


class ReferenceEchoGate(_EnergyGate):
    """Accepts a frame only when its energy clearly exceeds the echo predicted from the far end, and the noise.

    Until the echo path is measured it assumes the worst case of G.168 (6 dB return loss) at any
    delay up to `max_delay_ms`. While an echo is predicted the frame must also reach `min_rms`.
    With no far-end audio in that span nothing can echo: then the rule is only "clearly above the
    line noise", which the caller's speech always is. Once the delay is adopted and the band gains
    measured, an echo-bearing frame is accepted when it is `clear_margin_db` above the broadband echo
    or exceeds the echo in enough bands. The reference tells more than `bot_audible`, which is unused.
    """

    def __init__(
        self,
        min_rms: float = 200.0,
        max_delay_ms: float = 300.0,
        default_echo_return_loss_db: float = 6.0,
        margin_db: float = 2.5,
        clear_margin_db: float = 10.0,
        noise_margin_db: float = 6.0,
        delay_spread_ms: float = 5.0,
        window_ms: float = 1000.0,
        estimate_every_frames: int = 50,
        search_every_frames: int = 5,
        min_correlation: float = 0.6,
    ) -> None:
        self.min_energy = min_rms**2
        self.max_delay_blocks = int(round(max_delay_ms / BLOCK_MS))
        self.spread_blocks = int(round(delay_spread_ms / BLOCK_MS))
        self.window_blocks = int(round(window_ms / BLOCK_MS))
        self.estimate_every_frames = estimate_every_frames
        self.search_every_frames = search_every_frames
        self.min_correlation = min_correlation
        self.margin = 10.0 ** (margin_db / 10.0)
        self.clear_margin = 10.0 ** (clear_margin_db / 10.0)
        self.noise_margin = 10.0 ** (noise_margin_db / 10.0)
        self.echo_gain = 10.0 ** (-default_echo_return_loss_db / 10.0)
        self.echo_delay_blocks: int | None = None
        self.last_echo_path: tuple[int, float] | None = None
        self.noise_floor = NoiseFloorTracker()
        self.frames_until_estimate = estimate_every_frames
        self.history_blocks = self.window_blocks + self.max_delay_blocks + self.spread_blocks + BLOCKS_PER_FRAME
        # Energies averaged over the 20 ms ending at each block: one near frame against what it can echo.
        self.near_frames: list[float] = [0.0] * self.history_blocks
        self.far_frames: list[float] = [0.0] * self.history_blocks
        self.recent_near_blocks: Sequence[float] = [0.0] * (BLOCKS_PER_FRAME - 1)
        self.recent_far_blocks: Sequence[float] = [0.0] * (BLOCKS_PER_FRAME - 1)
        self.blocks_since_far_audio = self.history_blocks
        self.subbands = SubbandEchoModel(history_samples=(self.history_blocks + BLOCKS_PER_FRAME) * BLOCK_SAMPLES)

    @property
    def echo_return_loss_db(self) -> float:
        return -10.0 * math.log10(max(self.echo_gain, 1e-12))

    @property
    def echo_delay_ms(self) -> float | None:
        return None if self.echo_delay_blocks is None else self.echo_delay_blocks * BLOCK_MS

    def accepts_frames(
        self,
        near_and_far: np.ndarray,
        near_block_energies: Sequence[float],
        far_block_energies: Sequence[float],
        bot_audible: bool,
    ) -> bool:
        """True when the near frame is louder, by the margins, than the echo the far end can cause and the noise.

        Louder either broadband, or in enough bands once the echo path is measured.
        """
        self._push(near_block_energies, far_block_energies)
        self.subbands.push(near_and_far)
        near_energy = self.near_frames[-1]
        noise_energy = self.noise_floor.update(math.sqrt(near_energy)) ** 2
        if near_energy <= self.noise_margin * noise_energy:
            return False
        if self.blocks_since_far_audio > self.max_delay_blocks + self.spread_blocks + BLOCKS_PER_FRAME:
            return True
        if near_energy < self.min_energy:
            return False
        broadband_echo = self.echo_gain * self._loudest_far_frame()
        if self.subbands.excess_weights is None:
            return near_energy > self.margin * broadband_echo
        # Far above the echo broadband, the bands need no look; the spectral test is the costly one.
        if near_energy > self.clear_margin * broadband_echo:
            return True
        return self.subbands.shows_caller(near_and_far[0], noise_energy, near_energy)

    def _push(self, near_block_energies: Sequence[float], far_block_energies: Sequence[float]) -> None:
        self.near_frames += _frame_means(self.recent_near_blocks, near_block_energies)
        self.far_frames += _frame_means(self.recent_far_blocks, far_block_energies)
        self.recent_near_blocks = near_block_energies[1:]
        self.recent_far_blocks = far_block_energies[1:]
        # Trim in bulk now and then rather than every frame: amortised O(1) on the per-frame path.
        if len(self.near_frames) > 2 * self.history_blocks:
            del self.near_frames[: -self.history_blocks]
            del self.far_frames[: -self.history_blocks]
        far_audible = max(far_block_energies) > 0.0
        self.blocks_since_far_audio = 0 if far_audible else self.blocks_since_far_audio + BLOCKS_PER_FRAME
        self.frames_until_estimate -= 1
        if self.frames_until_estimate <= 0:
            # Until a path is adopted, estimate often: the bot has just started and the gate is at its bluntest.
            measured = self.echo_delay_blocks is not None
            self.frames_until_estimate = self.estimate_every_frames if measured else self.search_every_frames
            if self.blocks_since_far_audio < self.window_blocks:
                self._estimate()

    def _loudest_far_frame(self) -> float:
        """The loudest far-end 20 ms within the delays the echo may currently have."""
        if self.echo_delay_blocks is None:
            shortest, longest = 0, self.max_delay_blocks + self.spread_blocks
        else:
            shortest = max(0, self.echo_delay_blocks - self.spread_blocks)
            longest = self.echo_delay_blocks + self.spread_blocks
        end = len(self.far_frames) - shortest
        return max(self.far_frames[end - (longest - shortest) - 1:end])

    def _estimate(self) -> None:
        far_envelope = np.array(self.far_frames[-(self.window_blocks + self.max_delay_blocks):])
        near_envelope = np.array(self.near_frames[-self.window_blocks:])
        # Floor the far envelope where its echo would sink into the line noise, as the near one does:
        # otherwise the far end's quiet starts are seen before their echoes and bias the delay long.
        far_floor_energy = max(ENVELOPE_FLOOR_ENERGY, (self.noise_floor.floor_rms or 0.0) ** 2 / self.echo_gain)
        echo_path = estimate_echo_path(near_envelope, far_envelope, self.min_correlation, far_floor_energy)
        previous, self.last_echo_path = self.last_echo_path, echo_path
        # Adopt a path only when two estimates in a row agree on the delay, with the louder echo of the two.
        if echo_path is not None and previous is not None and abs(echo_path[0] - previous[0]) <= self.spread_blocks:
            self.echo_delay_blocks = echo_path[0]
            self.echo_gain = max(echo_path[1], previous[1])
            self.subbands.follow_echo_path(self.echo_delay_blocks, self.window_blocks // BLOCKS_PER_FRAME)


def make_echo_gate(mode: str, min_rms: float) -> RmsEchoGate | ReferenceEchoGate:
    """The echo gate for `mode`: "reference" (echo-aware, the default) or "rms" (the seed's rule)."""
    if mode == "reference":
        return ReferenceEchoGate(min_rms=min_rms)
    if mode == "rms":
        return RmsEchoGate(min_rms=min_rms)
    raise ValueError(f"echo gate mode must be one of {GATE_MODES}, got {mode!r}")
