"""Echo gates: decide whether an inbound frame is the caller's voice or the bot's own echo.

`RmsEchoGate` is the seed's rule. `ReferenceEchoGate` compares the inbound energy with the echo
predicted from the audio played to the caller (Geigel-style double-talk detection on energies):
it finds the echo delay by cross-correlating energy envelopes, measures the echo return loss at
that delay, and accepts a frame only when its energy clearly exceeds the predicted echo.
"""

from __future__ import annotations

import math

import numpy as np

FRAME_SAMPLES = 160
BLOCK_SAMPLES = 40
BLOCKS_PER_FRAME = FRAME_SAMPLES // BLOCK_SAMPLES
BLOCK_MS = 5.0
GATE_MODES = ("reference", "rms")


class _BlockHistory:
    """The latest `capacity` per-block values, readable oldest-first as one contiguous view.

    Every value is written twice, `capacity` apart, so the last `capacity` values are always
    one slice: no copy and no wrap-around on the per-frame path. Values arrive a frame at a time,
    so the capacity is rounded up to whole frames.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = -(-capacity // BLOCKS_PER_FRAME) * BLOCKS_PER_FRAME
        self.values = np.zeros(2 * self.capacity)
        self.next_index = 0

    def push(self, new_values: np.ndarray) -> None:
        end = self.next_index + len(new_values)
        self.values[self.next_index:end] = new_values
        self.values[self.next_index + self.capacity:end + self.capacity] = new_values
        self.next_index = end % self.capacity

    def latest(self) -> np.ndarray:
        """All `capacity` values, oldest first."""
        return self.values[self.next_index:self.next_index + self.capacity]


_BLOCK_STARTS = np.arange(0, FRAME_SAMPLES, BLOCK_SAMPLES)


def block_energies(frame: np.ndarray) -> np.ndarray:
    """Mean square of each 5 ms block of a 20 ms int16 frame (float64, int16 scale squared)."""
    energies = np.add.reduceat(np.square(frame, dtype=np.float64), _BLOCK_STARTS)
    energies *= 1.0 / BLOCK_SAMPLES
    return energies


class _EnergyGate:
    """Shared entry point: both gates decide on per-block energies of the near and far frames."""

    def accepts(self, near: np.ndarray, far: np.ndarray, bot_audible: bool) -> bool:
        """True when the inbound 20 ms frame `near` counts as the caller's voice; `far` is what played meanwhile."""
        return self.accepts_energies(block_energies(near), block_energies(far), bot_audible)

    def accepts_energies(
        self, near_block_energies: np.ndarray, far_block_energies: np.ndarray, bot_audible: bool
    ) -> bool:
        raise NotImplementedError


class RmsEchoGate(_EnergyGate):
    """While the bot is audible, accept only frames at least `min_rms` loud; otherwise accept all."""

    def __init__(self, min_rms: float = 200.0) -> None:
        self.min_rms = min_rms
        self.min_energy = min_rms**2

    def accepts_energies(
        self, near_block_energies: np.ndarray, far_block_energies: np.ndarray, bot_audible: bool
    ) -> bool:
        """The seed's rule on the frame's mean square; the far end is not used."""
        return not bot_audible or sum(near_block_energies.tolist()) / BLOCKS_PER_FRAME >= self.min_energy


def estimate_echo_path(
    near_envelope: np.ndarray, far_envelope: np.ndarray, min_correlation: float
) -> tuple[int, float] | None:
    """Echo delay (in blocks) and echo gain (energy ratio) from energy envelopes, or None if unsure.

    `far_envelope` is longer than `near_envelope` by the largest delay searched; both end at the
    same instant. Returns None when the far end was too quiet or the best correlation is weak
    (e.g. the caller talks over the echo).
    """
    window_blocks = len(near_envelope)
    max_lag_blocks = len(far_envelope) - window_blocks
    near_amplitude = np.sqrt(near_envelope)
    far_amplitude = np.sqrt(far_envelope)
    near_centered = near_amplitude - near_amplitude.sum() / window_blocks
    near_power = float(np.dot(near_centered, near_centered))
    # Entry j of each per-window array is the far end delayed by (max_lag_blocks - j) blocks.
    sums = np.cumsum(np.concatenate(([0.0], far_amplitude)))
    sums_of_squares = np.cumsum(np.concatenate(([0.0], far_envelope)))
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
    echo_gain = float(np.median(near_envelope[far_active] / aligned_far[far_active]))
    return max_lag_blocks - best_row, echo_gain


class ReferenceEchoGate(_EnergyGate):
    """Accepts a frame only when its energy clearly exceeds the echo predicted from the far end.

    Until the echo path is measured it assumes the worst case of G.168 (6 dB return loss) at any
    delay up to `max_delay_ms`. While an echo is predicted the frame must also reach `min_rms`.
    With no far-end audio in that span nothing can echo, so every frame is accepted, as the rms
    rule does when the bot is silent: the reference tells more than `bot_audible`, which is unused.
    """

    def __init__(
        self,
        min_rms: float = 200.0,
        max_delay_ms: float = 300.0,
        default_echo_return_loss_db: float = 6.0,
        margin_db: float = 4.0,
        delay_spread_ms: float = 10.0,
        window_ms: float = 1000.0,
        estimate_every_frames: int = 10,
        min_correlation: float = 0.6,
    ) -> None:
        self.min_energy = min_rms**2
        self.max_delay_blocks = int(round(max_delay_ms / BLOCK_MS))
        self.spread_blocks = int(round(delay_spread_ms / BLOCK_MS))
        self.window_blocks = int(round(window_ms / BLOCK_MS))
        self.estimate_every_frames = estimate_every_frames
        self.min_correlation = min_correlation
        self.margin = 10.0 ** (margin_db / 10.0)
        self.echo_gain = 10.0 ** (-default_echo_return_loss_db / 10.0)
        self.echo_delay_blocks: int | None = None
        self.frames_until_estimate = estimate_every_frames
        history_blocks = self.window_blocks + self.max_delay_blocks + self.spread_blocks + BLOCKS_PER_FRAME
        # Energies averaged over the 20 ms ending at each block: one near frame against what it can echo.
        self.near_frames = _BlockHistory(self.window_blocks)
        self.far_frames = _BlockHistory(history_blocks)
        self.recent_near_blocks = [0.0] * (BLOCKS_PER_FRAME - 1)
        self.recent_far_blocks = [0.0] * (BLOCKS_PER_FRAME - 1)

    @property
    def echo_return_loss_db(self) -> float:
        return -10.0 * math.log10(max(self.echo_gain, 1e-12))

    @property
    def echo_delay_ms(self) -> float | None:
        return None if self.echo_delay_blocks is None else self.echo_delay_blocks * BLOCK_MS

    def accepts_energies(
        self, near_block_energies: np.ndarray, far_block_energies: np.ndarray, bot_audible: bool
    ) -> bool:
        """True when the near frame is louder than the echo the far end could cause, by the margin."""
        near_frames = _frame_means(self.recent_near_blocks, near_block_energies.tolist())
        far_frames = _frame_means(self.recent_far_blocks, far_block_energies.tolist())
        self.recent_near_blocks = near_block_energies.tolist()[1:]
        self.recent_far_blocks = far_block_energies.tolist()[1:]
        self.near_frames.push(near_frames)
        self.far_frames.push(far_frames)
        self.frames_until_estimate -= 1
        if self.frames_until_estimate <= 0:
            self.frames_until_estimate = self.estimate_every_frames
            self._estimate()
        predicted_echo = self.echo_gain * self._loudest_far_frame()
        if predicted_echo <= 0.0:
            return True
        near_energy = near_frames[-1]
        return near_energy >= self.min_energy and near_energy > self.margin * predicted_echo

    def _loudest_far_frame(self) -> float:
        """The loudest far-end 20 ms within the delays the echo may currently have."""
        if self.echo_delay_blocks is None:
            shortest, longest = 0, self.max_delay_blocks + self.spread_blocks
        else:
            shortest = max(0, self.echo_delay_blocks - self.spread_blocks)
            longest = self.echo_delay_blocks + self.spread_blocks
        history = self.far_frames.latest()
        end = len(history) - shortest
        return float(history[end - (longest - shortest) - 1:end].max())

    def _estimate(self) -> None:
        far_envelope = self.far_frames.latest()[-(self.window_blocks + self.max_delay_blocks):]
        if far_envelope[-1] <= 0.0 and far_envelope.max() <= 0.0:
            return
        echo_path = estimate_echo_path(self.near_frames.latest(), far_envelope, self.min_correlation)
        if echo_path is not None:
            self.echo_delay_blocks, self.echo_gain = echo_path


def _frame_means(recent_blocks: list[float], new_blocks: list[float]) -> list[float]:
    """Mean over the 20 ms ending at each new block, given the blocks just before them."""
    joined = recent_blocks + new_blocks
    return [sum(joined[i:i + BLOCKS_PER_FRAME]) / BLOCKS_PER_FRAME for i in range(len(new_blocks))]


def make_echo_gate(mode: str, min_rms: float) -> RmsEchoGate | ReferenceEchoGate:
    """The echo gate for `mode`: "reference" (echo-aware, the default) or "rms" (the seed's rule)."""
    if mode == "reference":
        return ReferenceEchoGate(min_rms=min_rms)
    if mode == "rms":
        return RmsEchoGate(min_rms=min_rms)
    raise ValueError(f"echo gate mode must be one of {GATE_MODES}, got {mode!r}")
