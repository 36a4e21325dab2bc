"""What the line can echo at each delay, learned from the far end playing while the line stays quiet.

Until a delay is heard from, the gate must assume the worst echo there (G.168's 6 dB return loss).
Each frame played while the caller's line stays near its noise floor is evidence that no echo at
that delay is louder than what the line carried: the bound at each delay falls to the loudest such
evidence of the last second, and rises by at most `rise_db_per_frame`, so a caller talking over
the bot cannot lift it over their own voice before the onset fires.
"""

from __future__ import annotations

import numpy as np


class EchoBound:
    """Upper bounds on the echo's energy gain at delays of 0..`delay_count - 1` steps.

    Evidence is kept as far/near energy ratios (the reciprocal of a gain, +inf for none), so that
    a silent far end needs no division; the bound is the inverse of the smallest ratio of the window.
    """

    def __init__(
        self,
        delay_count: int,
        prior_gain_db: float = -6.0,
        window_frames: int = 50,
        min_evidence_frames: int = 5,
        visible_db: float = 6.0,
        rise_db_per_frame: float = 0.3,
        floor_fraction: float = 0.05,
        refresh_every_frames: int = 5,
    ) -> None:
        self.prior_gain = 10.0 ** (prior_gain_db / 10.0)
        self.gain = np.full(delay_count, self.prior_gain)
        self.ratios = np.full((window_frames, delay_count), np.inf)
        self.evidence_frames = np.zeros(delay_count, dtype=np.int64)
        self.row = 0
        self.min_evidence_frames = min_evidence_frames
        self.visible = 10.0 ** (visible_db / 10.0)
        # Bounds move only at each refresh: a ratio of a refresh's frames may lift them by its frames' rise.
        self.rise = 10.0 ** (rise_db_per_frame * refresh_every_frames / 10.0)
        self.floor_fraction = floor_fraction
        self.refresh_every_frames = refresh_every_frames
        self._fewest_ratios = 1.0 / (self.gain * self.rise)

    @property
    def gain_db(self) -> np.ndarray:
        return 10.0 * np.log10(self.gain)

    def predicted_echo(self, far_by_delay: np.ndarray) -> float:
        """The loudest echo the far-end frame energies (newest first, one per delay step) can cause now."""
        return float((self.gain * far_by_delay).max())

    def learn(self, near_energy: float, noise_energy: float, far_by_delay: np.ndarray) -> None:
        """One near frame's energy against the far-end frame energies that could echo into it."""
        visible = far_by_delay * self.gain > self.visible * noise_energy
        excess = max(near_energy - noise_energy, self.floor_fraction * noise_energy)
        ratios = np.where(visible, np.maximum(far_by_delay * (1.0 / excess), self._fewest_ratios), np.inf)
        self.evidence_frames += visible
        self.evidence_frames -= self.ratios[self.row] < np.inf
        self.ratios[self.row] = ratios
        self.row = (self.row + 1) % len(self.ratios)
        if self.row % self.refresh_every_frames == 0:
            self._refresh()

    def _refresh(self) -> None:
        learned = self.evidence_frames >= self.min_evidence_frames
        if learned.any():
            loudest = 1.0 / self.ratios.min(axis=0)
            self.gain = np.where(learned, np.minimum(loudest, self.prior_gain), self.gain)
            self._fewest_ratios = 1.0 / (self.gain * self.rise)
