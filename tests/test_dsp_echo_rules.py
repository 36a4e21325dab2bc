"""The reference echo gate's rules one at a time, on frames and estimates built to sit on each rule's edge."""

from __future__ import annotations

import numpy as np
import pytest

import dsp.echo
from dsp.echo import (
    BLOCKS_PER_FRAME, CONFIRM_FRAMES, DEFAULT_ECHO_GAIN, DELAY_STEPS, DOUBLE_TALK_FRAMES,
    ENVELOPE_FLOOR_ENERGY, JITTER_BLOCKS, MARGIN, SHORTEST_WINDOW_BLOCKS, SPREAD_BLOCKS, SUSPECT_FRAMES, WINDOW_BLOCKS,
    EchoPath, ReferenceEchoGate, estimate_echo_path,
)
from dsp.canceller import SpectralEchoCanceller
from dsp.echo_path import simulate_echo, to_int16

FRAME = 160
SILENCE = np.zeros(FRAME)


def square(rms: float) -> np.ndarray:
    """A 20 ms frame whose RMS is exactly `rms`."""
    return np.where(np.arange(FRAME) % 2, rms, -rms)


def noise(rms: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, rms, FRAME)


def feed(gate: ReferenceEchoGate, near: np.ndarray, far: np.ndarray) -> list[bool]:
    """Each 20 ms of `near` and `far` through the gate."""
    return [gate.accepts(near[i:i + FRAME], far[i:i + FRAME], True) for i in range(0, len(near) - FRAME + 1, FRAME)]


def unconfirmed_gate(monkeypatch, fits: list[bool], ready: bool) -> tuple[ReferenceEchoGate, list[EchoPath]]:
    """A gate whose path lost its confirmation at a far-end start, fed loud frames while the canceller
    is `ready` or not and reports `fits` (whether it removed most of each frame) in turn; its path after each."""
    gate = ReferenceEchoGate(min_rms=200.0)
    feed(gate, np.tile(square(30.0), 5), np.zeros(5 * FRAME))
    gate.path = EchoPath(20, 0.01)
    script = iter(fits)
    monkeypatch.setattr(SpectralEchoCanceller, "ready", property(lambda canceller: ready))
    monkeypatch.setattr(gate.canceller, "observe", lambda near: None)
    monkeypatch.setattr(gate.canceller, "cancels_most", lambda: next(script))
    paths = []
    for index in range(len(fits)):
        gate.accepts(noise(2000.0, index), noise(2000.0, 100 + index), True)
        paths.append(gate.path)
    return gate, paths


def test_a_delay_is_confirmed_once_the_canceller_removed_most_of_three_frames_in_a_row(monkeypatch):
    _, paths = unconfirmed_gate(monkeypatch, [True, True, False, True, True, True, True], ready=True)
    assert [path.confirmed for path in paths] == [False] * 5 + [True, True]
    assert [path.fitting_frames for path in paths[:6]] == [1, 2, 0, 1, 2, CONFIRM_FRAMES]


def test_a_canceller_not_yet_ready_never_confirms_a_delay(monkeypatch):
    _, paths = unconfirmed_gate(monkeypatch, [True] * 6, ready=False)
    assert not any(path.confirmed for path in paths)


def test_the_canceller_is_suspended_only_once_over_60_percent_of_the_last_second_was_taken_for_the_caller(
        monkeypatch):
    gate = ReferenceEchoGate(min_rms=200.0)
    counts_at_suspend = []
    monkeypatch.setattr(SpectralEchoCanceller, "ready", property(lambda canceller: True))
    monkeypatch.setattr(gate.canceller, "suspend", lambda: counts_at_suspend.append(gate.accepted_count))
    feed(gate, np.tile(square(30.0), 5), np.zeros(5 * FRAME))
    for index in range(45):
        assert gate.accepts(noise(3000.0, index), noise(100.0, 100 + index), True)
    assert counts_at_suspend == list(range(int(SUSPECT_FRAMES) + 1, 46))


@pytest.mark.parametrize(("near_over_noise", "accepted"), [(7.0, False), (10.0, True)])
def test_before_a_path_is_measured_a_frame_must_clear_the_bounded_echo_and_the_noise_together(
        near_over_noise, accepted):
    gate = ReferenceEchoGate(min_rms=200.0)
    feed(gate, np.tile(square(300.0), 20), np.zeros(20 * FRAME))
    noise_energy = 300.0**2
    far = square(np.sqrt(16.0 * noise_energy / DEFAULT_ECHO_GAIN / 4.0))  # the bound's echo of it: 4x the noise
    # Over the echo alone by the margin (5.3x the noise) and over the noise alone (4x), but not over both.
    assert 7.0 > MARGIN * 3.0 and 7.0 < MARGIN * 5.0 < 10.0
    assert gate.accepts(square(np.sqrt(near_over_noise * noise_energy)), far, True) is accepted


@pytest.mark.parametrize(("near_rms", "accepted"), [(200, True), (199, False)])
def test_with_the_canceller_unready_a_frame_at_exactly_min_rms_is_the_caller(near_rms, accepted):
    gate = ReferenceEchoGate(min_rms=200.0)
    far = np.tile(square(200.0), 10)
    feed(gate, np.tile(square(30.0), 10), far)
    gate._adopt(EchoPath(20, 0.25))  # its echo, 10 dB under the frame: clear of the margin, not of the clear margin
    assert not gate.canceller.ready
    assert gate.accepts(square(near_rms), square(200.0), True) is accepted


def test_echo_at_the_longest_delay_covered_is_judged_against_the_far_end_until_it_can_have_arrived():
    delay_ms = (DELAY_STEPS - 2) * 5.0  # 345 ms: past G.168's 300, within the jitter allowed
    far = np.concatenate([noise(3000.0, 1), noise(3000.0, 2), noise(3000.0, 3), np.zeros(30 * FRAME)])
    near = simulate_echo(far, delay_ms, 7.0)
    gate = ReferenceEchoGate(min_rms=200.0)
    feed(gate, np.tile(square(30.0), 5), np.zeros(5 * FRAME))
    verdicts = feed(gate, to_int16(near + np.tile(square(30.0), 33)), far)
    assert gate.path is None and not any(verdicts)


def test_an_envelope_varying_by_a_percent_is_placed_as_well_as_speech():
    far = 1e5 * np.random.default_rng(6).uniform(0.99, 1.01, 260)
    # Its log envelope's power is under 0.01 (speech's is in the hundreds): correlations are normalised by it, not floored.
    assert estimate_echo_path(0.05 * far[40:240], far, 0.6) == (20, pytest.approx(0.05))


def scripted_estimates(monkeypatch, estimates: list) -> list[dict]:
    """Make the gate's envelope correlation return `estimates` in turn; what each call was given."""
    calls = []
    script = iter(estimates)

    def scripted(near_envelope, far_envelope, min_correlation, far_floor_energy):
        calls.append({"window_blocks": len(near_envelope), "far_floor_energy": far_floor_energy})
        return next(script)

    monkeypatch.setattr(dsp.echo, "estimate_echo_path", scripted)
    return calls


@pytest.mark.parametrize(("second_delay", "adopted"), [(20 + SPREAD_BLOCKS, True), (21 + SPREAD_BLOCKS, False)])
def test_a_first_delay_is_adopted_when_two_estimates_in_a_row_are_within_5_ms(monkeypatch, second_delay, adopted):
    scripted_estimates(monkeypatch, [(20, 0.01), (second_delay, 0.02)])
    gate = ReferenceEchoGate(min_rms=200.0)
    gate._estimate()
    gate._estimate()
    assert gate.path == (EchoPath(second_delay, 0.02) if adopted else None)


@pytest.mark.parametrize(("moved_by", "confirmed"), [(JITTER_BLOCKS, True), (JITTER_BLOCKS + 1, False)])
def test_an_unconfirmed_delay_is_confirmed_by_one_estimate_within_50_ms_of_it(monkeypatch, moved_by, confirmed):
    scripted_estimates(monkeypatch, [(20 + moved_by, 0.02)])
    gate = ReferenceEchoGate(min_rms=200.0)
    gate.path = EchoPath(20, 0.01, confirmed=False)
    gate._estimate()
    assert gate.path == (EchoPath(20 + moved_by, 0.02) if confirmed else EchoPath(20, 0.01, confirmed=False))


@pytest.mark.parametrize(("accepted_count", "moved"), [(int(DOUBLE_TALK_FRAMES), True), (int(DOUBLE_TALK_FRAMES) + 1, False)])
def test_over_a_fifth_of_the_window_taken_for_the_caller_no_new_delay_is_believed(monkeypatch, accepted_count, moved):
    scripted_estimates(monkeypatch, [(40, 0.01)])
    gate = ReferenceEchoGate(min_rms=200.0)
    gate.path, gate.last_estimate, gate.accepted_count = EchoPath(20, 0.01), (40, 0.01), accepted_count
    gate._estimate()
    assert gate.path == (EchoPath(40, 0.01) if moved else EchoPath(20, 0.01))


@pytest.mark.parametrize(("raised_gain", "believed"), [(0.021, True), (0.019, False)])
def test_in_double_talk_only_an_echo_over_twice_as_loud_near_the_delay_is_believed(monkeypatch, raised_gain, believed):
    scripted_estimates(monkeypatch, [(22, raised_gain)])
    gate = ReferenceEchoGate(min_rms=200.0)
    gate.path, gate.accepted_count = EchoPath(20, 0.01), int(DOUBLE_TALK_FRAMES) + 1
    gate._estimate()
    assert gate.path == (EchoPath(20, raised_gain, confirmed=False) if believed else EchoPath(20, 0.01))


@pytest.mark.parametrize(("path", "line_rms", "floor_energy"), [
    (None, 300.0, 300.0**2 / DEFAULT_ECHO_GAIN),
    (EchoPath(20, 0.001), 300.0, 300.0**2 / 0.001),
    (None, 5.0, ENVELOPE_FLOOR_ENERGY),
])
def test_the_far_envelope_is_floored_where_its_echo_would_sink_into_the_line_noise(
        monkeypatch, path, line_rms, floor_energy):
    calls = scripted_estimates(monkeypatch, [None])
    gate = ReferenceEchoGate(min_rms=200.0)
    feed(gate, np.tile(square(line_rms), 3), np.zeros(3 * FRAME))
    gate.path = path
    gate._estimate()
    assert calls[0]["far_floor_energy"] == pytest.approx(floor_energy)


def test_each_estimate_covers_only_what_followed_the_far_end_start_and_at_most_a_second(monkeypatch):
    calls = scripted_estimates(monkeypatch, [None] * 100)
    gate = ReferenceEchoGate(min_rms=200.0)
    feed(gate, np.tile(square(300.0), 60), np.zeros(60 * FRAME))
    far = np.concatenate([noise(1000.0, index) for index in range(80)])
    feed(gate, np.tile(square(300.0), 80), far)
    windows = [call["window_blocks"] for call in calls]
    # Every 100 ms from 300 ms into the talkspurt: no path is known and the line is not shown quiet.
    assert windows == [min(WINDOW_BLOCKS, blocks) for blocks in range(SHORTEST_WINDOW_BLOCKS, 80 * 4 + 1, 20)]


@pytest.mark.parametrize("talkspurt_frames", range(20, 25))
def test_estimates_stop_once_the_far_end_has_been_silent_for_a_second(monkeypatch, talkspurt_frames):
    gate = ReferenceEchoGate(min_rms=200.0)
    silent_blocks = []
    monkeypatch.setattr(gate, "_estimate", lambda: silent_blocks.append(gate.blocks_since_far_audio))
    far = np.concatenate([noise(1000.0, index) for index in range(talkspurt_frames)] + [np.zeros(60 * FRAME)])
    feed(gate, np.tile(square(300.0), len(far) // FRAME), far)
    # Every 100 ms (the line is not shown quiet), the last one in the 100 ms before the second is up.
    assert WINDOW_BLOCKS - 5 * BLOCKS_PER_FRAME <= max(silent_blocks) < WINDOW_BLOCKS
