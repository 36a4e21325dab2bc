"""Streaming resampler: the split of the input never changes the output, and speech-band tones survive."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsp.resample import SUPPORTED_RATES_HZ, StreamingResampler

RATE_PAIRS = [(a, b) for a in SUPPORTED_RATES_HZ for b in SUPPORTED_RATES_HZ]


def noise(sample_count: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(sample_count) * 4000).clip(-32768, 32767).astype(np.int16)


def tone(frequency_hz: float, rate_hz: int, seconds: float, amplitude: float = 8000.0) -> np.ndarray:
    t = np.arange(int(rate_hz * seconds)) / rate_hz
    return np.rint(amplitude * np.sin(2 * np.pi * frequency_hz * t)).astype(np.int16)


def rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(samples.astype(np.float64) ** 2)))


@pytest.mark.parametrize(("from_hz", "to_hz"), RATE_PAIRS)
def test_twenty_ms_frames_give_the_one_shot_output(from_hz, to_hz):
    signal = noise(from_hz, seed=from_hz + to_hz)
    one_shot = StreamingResampler(from_hz, to_hz).process(signal)
    streaming = StreamingResampler(from_hz, to_hz)
    frame = from_hz // 50
    framed = np.concatenate([streaming.process(signal[i:i + frame]) for i in range(0, len(signal), frame)])
    assert len(one_shot) == len(signal) * to_hz // from_hz
    assert np.max(np.abs(framed.astype(np.int32) - one_shot)) <= 1


@settings(max_examples=40, deadline=None)
@given(
    rates=st.sampled_from(RATE_PAIRS),
    cuts=st.lists(st.integers(0, 2400), max_size=12),
    seed=st.integers(0, 1000),
)
def test_any_split_of_the_input_gives_the_one_shot_output(rates, cuts, seed):
    from_hz, to_hz = rates
    signal = noise(2400, seed)
    one_shot = StreamingResampler(from_hz, to_hz).process(signal)
    streaming = StreamingResampler(from_hz, to_hz)
    pieces = np.split(signal, sorted(cuts))
    framed = np.concatenate([streaming.process(piece) for piece in pieces])
    assert len(framed) == len(one_shot)
    assert np.max(np.abs(framed.astype(np.int32) - one_shot), initial=0) <= 1


def test_a_tone_survives_8k_to_16k_and_back():
    original = tone(1000.0, 8000, 1.0)
    up = StreamingResampler(8000, 16000)
    down = StreamingResampler(16000, 8000)
    restored = np.concatenate(
        [down.process(up.process(original[i:i + 160])) for i in range(0, len(original), 160)]
    )
    settled = restored[400:].astype(np.float64)
    assert rms(settled) == pytest.approx(rms(original[400:]), rel=0.02)
    # Still a pure 1 kHz tone, merely delayed by the filters: a fitted sinusoid leaves a tiny residue.
    t = np.arange(400, len(original)) / 8000
    basis = np.stack([np.sin(2 * np.pi * 1000 * t), np.cos(2 * np.pi * 1000 * t)], axis=1)
    fitted, *_ = np.linalg.lstsq(basis, settled, rcond=None)
    assert rms(settled - basis @ fitted) < 0.01 * rms(settled)


def test_content_above_the_new_nyquist_is_removed_when_downsampling():
    high = tone(6000.0, 16000, 0.5)
    assert rms(StreamingResampler(16000, 8000).process(high)[200:]) < 0.01 * rms(high)


def test_unsupported_rates_are_refused_with_the_allowed_ones():
    with pytest.raises(ValueError, match="8000, 16000, 24000"):
        StreamingResampler(44100, 8000)


def test_the_filter_is_designed_once_per_resampler():
    resampler = StreamingResampler(8000, 24000)
    taps = resampler.phase_taps
    resampler.process(noise(160, seed=1))
    resampler.process(noise(160, seed=2))
    assert resampler.phase_taps is taps
