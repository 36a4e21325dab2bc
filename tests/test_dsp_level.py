"""Levels on the int16 scale and the noise-floor tracker."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dsp.level import SILENCE_DBFS, NoiseFloorTracker, dbfs, energy_ratio, rms


def test_rms_of_a_constant_is_its_magnitude():
    assert rms(np.full(160, -200, dtype=np.int16)) == pytest.approx(200.0)


def test_rms_of_a_sine_is_amplitude_over_root_two():
    t = np.arange(160) / 8000
    sine = np.rint(10000 * np.sin(2 * np.pi * 500 * t)).astype(np.int16)
    assert rms(sine) == pytest.approx(10000 / math.sqrt(2), rel=1e-3)


def test_rms_does_not_overflow_on_full_scale_int16():
    assert rms(np.full(160, -32768, dtype=np.int16)) == pytest.approx(32768.0)


def test_dbfs_is_zero_at_full_scale_and_minus_six_at_half():
    assert dbfs(np.full(160, -32768, dtype=np.int16)) == pytest.approx(0.0)
    assert dbfs(np.full(160, 16384, dtype=np.int16)) == pytest.approx(-6.02, abs=0.01)


def test_dbfs_of_silence_is_a_finite_floor():
    assert dbfs(np.zeros(160, dtype=np.int16)) == SILENCE_DBFS


def test_noise_floor_drops_at_once_and_rises_slowly():
    tracker = NoiseFloorTracker(rise_db_per_s=3.0, frame_ms=20.0)
    assert tracker.update(50.0) == 50.0
    assert tracker.update(20.0) == 20.0
    # One second of loud speech lifts the floor by only 3 dB.
    for _ in range(50):
        floor = tracker.update(3000.0)
    assert floor == pytest.approx(20.0 * 10 ** (3.0 / 20), rel=1e-6)


def test_noise_floor_never_sticks_at_digital_silence():
    tracker = NoiseFloorTracker(min_floor_rms=1.0)
    assert tracker.update(0.0) == 1.0
    assert tracker.update(500.0) > 1.0


def test_decibels_become_energy_ratios():
    assert [energy_ratio(db) for db in (0.0, 10.0, -30.0)] == [1.0, 10.0, pytest.approx(0.001)]
    assert energy_ratio(3.0) == pytest.approx(1.9953, abs=1e-4)
