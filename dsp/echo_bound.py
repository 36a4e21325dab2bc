"""What the line can echo at each delay, learned from the far end playing while the line stays quiet.

Until a delay is heard from, the gate must assume the worst echo there (G.168's 6 dB return loss).
Each frame played is evidence about the echo at every delay: the line carried no more than its
excess over the noise floor, so the echo's gain there is at most that excess over the far frame's
energy. The bound at each delay is the energy-weighted ratio of the last second's evidence, with
headroom for a coloured path returning some sounds louder than others; it rises by at most
`rise_db_per_frame`, so a caller talking over the bot cannot lift it over their own voice before
the onset fires.
"""

from __future__ import annotations

import numpy as np

from dsp.level import energy_ratio


class EchoBound:
    """Upper bounds on the echo's energy gain at delays of 0..`delay_count - 1` steps."""

    def __init__(
        self,
        delay_count: int,
        prior_gain_db: float,
        window_frames: int = 50,
        min_evidence_frames: int = 5,
        visible_db: float = 6.0,
        headroom_db: float = 6.0,
        rise_db_per_frame: float = 0.3,
        floor_fraction: float = 0.05,
        refresh_every_frames: int = 5,
    ) -> None:
        self.prior_gain = energy_ratio(prior_gain_db)
        self.gain = np.full(delay_count, self.prior_gain)
        # Per frame of the window and delay: the far energy that counts as evidence, and the line's excess then.
        self.far = np.zeros((window_frames, delay_count))
        self.excess = np.zeros((window_frames, delay_count))
        self.evidence_frames = np.zeros(delay_count, dtype=np.int64)
        self.row = 0
        self.min_evidence_frames = min_evidence_frames
        # Evidence only from far-end frames whose echo at the worst case would stand over the noise.
        self.visible_far = energy_ratio(visible_db) / self.prior_gain
        self.headroom = energy_ratio(headroom_db)
        self.rise = energy_ratio(rise_db_per_frame * refresh_every_frames)
        self.floor_fraction = floor_fraction
        self.refresh_every_frames = refresh_every_frames

    @property
    def loudest_gain(self) -> float:
        return float(self.gain.max())

    @property
    def gain_db(self) -> np.ndarray:
        return 10.0 * np.log10(self.gain)

    def predicted_echo(self, far_by_delay: np.ndarray) -> float:
        """The loudest echo the far-end frame energies (newest first, one per delay step) can cause now."""
        return float((self.gain * far_by_delay).max())

    def learn(self, near_energy: float, noise_energy: float, far_by_delay: np.ndarray) -> None:
        """One near frame's energy against the far-end frame energies that could echo into it."""
        visible = far_by_delay > self.visible_far * noise_energy
        excess = max(near_energy - noise_energy, self.floor_fraction * noise_energy)
        row = self.row
        self.evidence_frames += visible
        self.evidence_frames -= self.far[row] > 0.0
        np.multiply(far_by_delay, visible, out=self.far[row])
        np.multiply(visible, excess, out=self.excess[row])
        self.row = (row + 1) % len(self.far)
        if self.row % self.refresh_every_frames == 0:
            self._refresh()

    def _refresh(self) -> None:
        learned = self.evidence_frames >= self.min_evidence_frames
        if learned.any():
            far_sums = self.far.sum(axis=0)
            bound = self.headroom * self.excess.sum(axis=0) / np.maximum(far_sums, 1e-12)
            self.gain = np.where(learned, np.minimum(np.minimum(bound, self.gain * self.rise), self.prior_gain), self.gain)
