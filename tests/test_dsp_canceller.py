"""The spectral echo canceller in the reference gate: band powers, delay refinement, the residual, and early onsets."""

from __future__ import annotations

import numpy as np
import pytest

import dsp.canceller

from dsp.echo import ReferenceEchoGate, block_energies
from dsp.echo_path import line_noise, simulate_echo, to_int16
from dsp.g711 import ulaw_encode
from dsp.inbound import InboundFrameAnalyzer
from dsp.level import rms
from dsp.canceller import BAND_BINS, BAND_COUNT, SpectralEchoCanceller, band_sums, real_spectra, refine_delay

FRAME = 160
NOISE_RMS = 30.0
NARROW_HYBRID = {"hybrid_band_hz": (400.0, 2800.0), "hybrid_order": 4}


def frames(samples: np.ndarray) -> list[np.ndarray]:
    return [samples[i:i + FRAME] for i in range(0, len(samples) - FRAME + 1, FRAME)]


def onset_frames(near: np.ndarray, far: np.ndarray) -> list[int]:
    analyzer = InboundFrameAnalyzer("reference", min_rms=200.0, vad_aggressiveness=2, voice_frames=6, debounce_ms=350)
    payloads = frames(ulaw_encode(near))
    return [
        index
        for index, (payload, far_frame) in enumerate(zip(payloads, frames(far)))
        if analyzer.analyze(payload.tobytes(), far_frame, True, 20.0 * index).onset
    ]


def first_loud_frame(samples: np.ndarray) -> int:
    return next(index for index, frame in enumerate(frames(samples)) if rms(frame) > 300.0)


@pytest.mark.parametrize("transform", ["compiled", "public fallback"])
def test_band_sums_of_the_spectra_sum_the_rfft_bins_of_each_band(transform, monkeypatch):
    if transform == "public fallback":
        monkeypatch.setattr(dsp.canceller, "_pocketfft_r2c", None)
    rows = np.random.default_rng(0).normal(0.0, 1000.0, (3, FRAME))
    bin_powers = np.abs(np.fft.rfft(rows)) ** 2
    expected = bin_powers[:, 1:].reshape(3, BAND_COUNT, BAND_BINS).sum(axis=2)
    spectra = real_spectra(rows, 1)
    np.testing.assert_allclose(band_sums(spectra.real**2 + spectra.imag**2), expected, rtol=1e-9)


def test_after_a_suspend_the_residual_is_measured_on_the_new_line_only():
    canceller = SpectralEchoCanceller(history_samples=8000)
    rng = np.random.default_rng(19)
    canceller.delay_samples = 0
    learned_since_suspend = []
    for index in range(120):
        far = rng.normal(0.0, 1000.0, FRAME)
        near = (0.1 if index < 80 else 1.0) * far
        canceller.push(np.array((near, far)))
        canceller.observe(near)
        if index == 80:
            canceller.suspend()
        if index >= 80:
            learned_since_suspend.append(canceller._frame_bands().copy())
        canceller.learn()
    filled = canceller.learned_bands[: canceller.learned_bands_filled]
    # Every row measured from came after the suspend: none of the old line's is left in the ring
    # (near and far rows compared; the residual's follows the filter as it is refreshed).
    assert len(filled) == len(learned_since_suspend)
    assert all(any(np.array_equal(row[[0, 2]], new[[0, 2]]) for new in learned_since_suspend) for row in filled)


def test_block_energies_refuse_anything_but_a_frame_pair():
    with pytest.raises(ValueError, match=r"shape \(2, 160\), got \(160,\)"):
        block_energies(np.zeros(FRAME))


@pytest.mark.parametrize("lag_samples", [-17, 0, 5, 31])
def test_refine_delay_finds_the_lag_of_speech_to_the_sample(speech_clip, lag_samples):
    far = speech_clip("bot_answer_en.wav").astype(np.float64)[8000:12000]
    near = np.roll(far, lag_samples) + np.random.default_rng(4).normal(0.0, 30.0, len(far))
    assert refine_delay(near, far, search_samples=48) == lag_samples


def run_gate(near: np.ndarray, far: np.ndarray) -> ReferenceEchoGate:
    gate = ReferenceEchoGate(min_rms=200.0)
    for near_frame, far_frame in zip(frames(near), frames(far)):
        gate.accepts(near_frame, far_frame, bot_audible=True)
    return gate


def canceller_moved_to(
    speech_clip, new_delay_ms: float, new_hybrid: dict,
) -> tuple[SpectralEchoCanceller, np.ndarray, int | None]:
    """A canceller learned on a 93 ms echo; then, after a silence, 600 ms of the next response echoed at
    `new_delay_ms` through `new_hybrid`: the canceller, its filter before, and what follow_moved_echo returned."""
    answer = speech_clip("bot_answer_en.wav").astype(np.float64)
    near = simulate_echo(answer, 93.0, 10.0, **NARROW_HYBRID) + line_noise(len(answer), NOISE_RMS, np.random.default_rng(6))
    canceller = run_gate(to_int16(near), to_int16(answer)).canceller
    learned_filter = canceller.echo_filter.copy()
    greeting = np.concatenate([np.zeros(4000), speech_clip("bot_greeting_en.wav").astype(np.float64)[:4800]])
    echo = simulate_echo(greeting, new_delay_ms, 10.0, **new_hybrid) + line_noise(len(greeting), NOISE_RMS,
                                                                                  np.random.default_rng(7))
    for near_frame, far_frame in zip(frames(to_int16(echo)), frames(to_int16(greeting))):
        canceller.push(np.array((near_frame, far_frame), dtype=np.float64))
    return canceller, learned_filter, canceller.follow_moved_echo(search_samples=400, span_samples=4800)


def test_an_echo_moved_by_jitter_is_followed_to_its_new_delay_with_the_filter_kept(speech_clip):
    canceller, learned_filter, moved = canceller_moved_to(speech_clip, 128.0, NARROW_HYBRID)
    # 128 ms is 1024 samples; the path's own group delay adds a little, as it did at 93 ms.
    assert moved is not None and 1024 <= moved <= 1024 + 16
    assert canceller.delay_samples == moved - canceller.lead_samples
    np.testing.assert_array_equal(canceller.echo_filter, learned_filter)
    assert canceller.ready


def test_an_echo_through_another_path_is_not_followed_and_the_delay_stays(speech_clip):
    canceller, _, moved = canceller_moved_to(speech_clip, 128.0, {})
    assert moved is None
    assert 744 <= canceller.delay_samples <= 744 + 16


def test_the_residual_echo_sits_far_under_the_echo_on_a_coloured_path(speech_clip):
    far = speech_clip("bot_answer_en.wav").astype(np.float64)
    near = simulate_echo(far, 93.0, 6.0, **NARROW_HYBRID) + line_noise(len(far), NOISE_RMS, np.random.default_rng(1))
    gate = run_gate(to_int16(near), to_int16(far))
    canceller = gate.canceller
    assert gate.echo_delay_ms == pytest.approx(93.0, abs=5.0)
    assert canceller.ready
    # The sample delay: the path's own group delay adds a little to the 93 ms (744 samples).
    assert 744 <= canceller.delay_samples <= 744 + 16
    # A near-linear hybrid: what the per-bin filter leaves is at least 12 dB under the echo itself.
    assert 10.0 * np.log10(canceller.residual_gain) < gate.echo_return_loss_db * -1.0 - 12.0


def test_a_line_switched_to_a_far_louder_echo_starts_the_filter_afresh(speech_clip):
    far = speech_clip("bot_answer_en.wav").astype(np.float64)
    switch = len(far) // 2 // FRAME * FRAME
    after_switch_frames = 100
    echo = np.concatenate([simulate_echo(far, 93.0, 30.0)[:switch], simulate_echo(far, 93.0, 6.0)[switch:]])
    near = echo + line_noise(len(far), NOISE_RMS, np.random.default_rng(5))
    end = switch + after_switch_frames * FRAME
    gate = run_gate(to_int16(near)[:end], to_int16(far)[:end])
    assert gate.echo_return_loss_db == pytest.approx(6.0, abs=3.0)
    # Learned only since the switch: the filter of the quiet line was dropped, not carried over.
    assert 0 < gate.canceller.learned_frames < after_switch_frames


@pytest.mark.parametrize(("delay_ms", "hybrid"), [(37.0, NARROW_HYBRID), (161.0, NARROW_HYBRID), (110.0, {})])
def test_echo_alone_hardly_passes_once_the_bands_are_measured_and_never_fires(speech_clip, delay_ms, hybrid):
    far = speech_clip("bot_greeting_en.wav").astype(np.float64)
    far = np.concatenate([far, far])
    near = simulate_echo(far, delay_ms, 6.0, **hybrid) + line_noise(len(far), NOISE_RMS, np.random.default_rng(2))
    near, far = to_int16(near), to_int16(far)
    gate = ReferenceEchoGate(min_rms=200.0)
    passed_after_measuring = []
    for near_frame, far_frame in zip(frames(near), frames(far)):
        measured = gate.canceller.ready
        passed = gate.accepts(near_frame, far_frame, bot_audible=True)
        if measured:
            passed_after_measuring.append(passed)
    assert len(passed_after_measuring) > 500
    # A steep hybrid rings past the far end's onsets and stops: a stray frame may pass, never a run.
    assert sum(passed_after_measuring) <= 0.01 * len(passed_after_measuring)
    assert onset_frames(near, far) == []


@pytest.mark.parametrize("under_echo_db", [3.0, 4.0])
@pytest.mark.parametrize("caller_clip", ["caller_interrupt_en.wav", "caller_question_en.wav"])
def test_a_caller_quieter_than_the_echo_fires_within_two_frames_of_the_floor(speech_clip, caller_clip, under_echo_db):
    bot = speech_clip("bot_answer_en.wav").astype(np.float64)
    echo = simulate_echo(bot, 110.0, 6.0)
    caller = speech_clip(caller_clip).astype(np.float64)
    caller_at = 3 * 8000
    caller_span = slice(caller_at, caller_at + len(caller))
    # Scale the caller under the echo it talks over: broadband energy alone cannot tell them apart.
    caller *= rms(echo[caller_span]) / rms(caller) * 10.0 ** (-under_echo_db / 20.0)
    near = echo + line_noise(len(bot), NOISE_RMS, np.random.default_rng(3))
    near[caller_span] += caller[: len(bot) - caller_at]
    onsets = onset_frames(to_int16(near), to_int16(bot))
    speech_frame = caller_at // FRAME + first_loud_frame(caller)
    assert onsets, "the caller talking over the bot was never detected"
    # Six voiced frames is the floor; the broadband rule alone needed several more here.
    assert speech_frame < onsets[0] <= speech_frame + 6 + 2


@pytest.mark.parametrize(("delay_ms", "hybrid"), [(0.0, {}), (125.0, {}), (125.0, NARROW_HYBRID)])
def test_once_learned_the_canceller_leaves_the_echo_of_a_6_db_hybrid_20_db_under(speech_clip, delay_ms, hybrid):
    answer = speech_clip("bot_answer_en.wav").astype(np.float64)
    near = simulate_echo(answer, delay_ms, 6.0, **hybrid) + line_noise(len(answer), NOISE_RMS, np.random.default_rng(8))
    gate = ReferenceEchoGate(min_rms=200.0)
    removed_db = []
    for index, (near_frame, far_frame) in enumerate(zip(frames(to_int16(near)), frames(to_int16(answer)))):
        assert not gate.accepts(near_frame, far_frame, True)
        canceller = gate.canceller
        if index >= 150 and canceller.ready and canceller._spectra is not None:
            near_bands, residual_bands, far_bands = canceller._frame_bands()
            if far_bands.sum() > 1e9:
                removed_db.append(10.0 * np.log10(near_bands.sum() / residual_bands.sum()))
    # A one-tap product of windowed spectra leaves some 15 dB: the hybrid's dispersion crosses the frame's edge.
    assert len(removed_db) > 100 and np.median(removed_db) >= 20.0


def test_a_residual_within_the_residual_echo_of_the_bands_the_far_end_plays_is_no_caller():
    canceller = SpectralEchoCanceller(history_samples=8000)
    canceller.residual_gain = 1e-4
    canceller.band_gains = np.full(BAND_COUNT, 1e-4)
    canceller.band_gains[2] = 0.1  # a band the canceller removes little of
    far_bands = np.zeros(BAND_COUNT)
    far_bands[2] = 1e8
    residual_bands = 0.2 * far_bands  # twice that band's residual echo, far over the broadband one
    canceller._bands = np.array((residual_bands + far_bands * 0.3, residual_bands, far_bands))
    assert not canceller.shows_caller(noise_energy=0.0, near_energy=0.0)
    canceller._bands[1] *= 10.0
    assert canceller.shows_caller(noise_energy=0.0, near_energy=0.0)
