"""Echo gates and the inbound path on echo scenarios built from the real clips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.clips import load_wav
from dsp.echo import EchoPath, ReferenceEchoGate, RmsEchoGate, estimate_echo_path, make_echo_gate
from dsp.echo_bound import EchoBound
from dsp.echo_path import active_speech_rms, line_noise, simulate_echo, to_int16
from dsp.g711 import ulaw_decode, ulaw_encode
from dsp.inbound import FrameAnalysis, InboundFrameAnalyzer

FRAME = 160
NOISE_RMS = 30.0
VOICES = Path(__file__).resolve().parent.parent / "scripts" / "voices"
NARROW_HYBRID = {"hybrid_band_hz": (400.0, 2800.0), "hybrid_order": 4}


def frames(samples: np.ndarray) -> list[np.ndarray]:
    return [samples[i:i + FRAME] for i in range(0, len(samples) - FRAME + 1, FRAME)]


def run_call(near: np.ndarray, far: np.ndarray, bot_audible: bool, gate_mode: str = "reference") -> list[FrameAnalysis]:
    """Every frame through the inbound path, as the call code feeds it."""
    analyzer = InboundFrameAnalyzer(gate_mode, min_rms=200.0, vad_aggressiveness=2, voice_frames=6, debounce_ms=350)
    payloads = frames(ulaw_encode(near))
    return [
        analyzer.analyze(payload.tobytes(), far_frame, bot_audible, 20.0 * index)
        for index, (payload, far_frame) in enumerate(zip(payloads, frames(far)))
    ]


def echo_call(bot: np.ndarray, delay_ms: float, erl_db: float, seed: int, caller=None, caller_at_s=0.0):
    """The bot's clip played (plus 0.5 s of nothing), its echo and line noise, and optionally a caller."""
    far = np.concatenate([bot, np.zeros(4000)]).astype(np.float64)
    near = simulate_echo(far, delay_ms, erl_db) + line_noise(len(far), NOISE_RMS, np.random.default_rng(seed))
    if caller is not None:
        start = int(caller_at_s * 8000)
        near[start:start + len(caller)] += caller[: len(near) - start]
    return to_int16(near), to_int16(far)


@pytest.mark.parametrize("erl_db", [6.0, 10.0, 20.0])
@pytest.mark.parametrize(("clip", "delay_ms"), [
    ("bot_answer_en.wav", 0.0), ("bot_greeting_en.wav", 30.0), ("bot_answer_en.wav", 180.0),
    ("bot_greeting_he.wav", 280.0)])
def test_echo_alone_is_never_accepted_in_reference_mode(speech_clip, clip, delay_ms, erl_db):
    near, far = echo_call(speech_clip(clip), delay_ms, erl_db, seed=int(delay_ms + erl_db))
    analyses = run_call(near, far, bot_audible=True)
    assert not any(analysis.passes_gate for analysis in analyses)
    assert not any(analysis.onset for analysis in analyses)


def test_the_seed_rule_lets_loud_echo_through(speech_clip):
    # Why the reference gate exists: at 10 dB return loss the rms rule fires on the bot's own voice.
    near, far = echo_call(speech_clip("bot_answer_en.wav"), 100.0, 10.0, seed=1)
    assert any(analysis.onset for analysis in run_call(near, far, bot_audible=True, gate_mode="rms"))


def test_reference_gate_measures_the_echo_path(speech_clip):
    near, far = echo_call(speech_clip("bot_answer_en.wav"), 120.0, 10.0, seed=2)
    gate = ReferenceEchoGate(min_rms=200.0)
    for near_frame, far_frame in zip(frames(near), frames(far)):
        gate.accepts(near_frame, far_frame, bot_audible=True)
    assert gate.echo_delay_ms == pytest.approx(120.0, abs=5.0)
    assert gate.echo_return_loss_db == pytest.approx(10.0, abs=1.5)


@pytest.mark.parametrize("erl_db", [6.0, 10.0, 20.0])
@pytest.mark.parametrize("caller_clip", ["caller_interrupt_en.wav", "caller_interrupt_he.wav"])
def test_double_talk_fires_an_onset_while_the_caller_speaks(speech_clip, caller_clip, erl_db):
    caller = speech_clip(caller_clip)
    caller_at_s = 3.0
    near, far = echo_call(speech_clip("bot_answer_en.wav"), 110.0, erl_db, seed=3, caller=caller, caller_at_s=caller_at_s)
    onsets_ms = [20.0 * index for index, analysis in enumerate(run_call(near, far, bot_audible=True)) if analysis.onset]
    caller_end_ms = 1000.0 * caller_at_s + len(caller) / 8.0
    assert onsets_ms, "the caller talking over the bot was never detected"
    assert 1000.0 * caller_at_s < onsets_ms[0] < caller_end_ms


@pytest.mark.parametrize("gate_mode", ["reference", "rms"])
def test_caller_alone_is_accepted_and_fires_one_onset_per_utterance_start(speech_clip, gate_mode):
    caller = speech_clip("caller_question_en.wav").astype(np.float64)
    near = np.concatenate([np.zeros(4000), caller, np.zeros(4000)])
    near = to_int16(near + line_noise(len(near), NOISE_RMS, np.random.default_rng(4)))
    analyses = run_call(near, np.zeros_like(near), bot_audible=False, gate_mode=gate_mode)
    first_onset = next(index for index, analysis in enumerate(analyses) if analysis.onset)
    # Speech starts at frame 25 (0.5 s of silence, then the clip's first loud frame): six frames later.
    assert 25 + 4 <= first_onset <= 25 + 7
    assert sum(analysis.passes_gate and analysis.voiced for analysis in analyses) > 0.5 * len(caller) / FRAME


@pytest.mark.parametrize("during_echo", [False, True])
def test_a_loud_click_never_fires_an_onset(speech_clip, during_echo):
    click = speech_clip("click_noise_60ms.wav").astype(np.float64)
    click *= 30000.0 / np.abs(click).max()
    if during_echo:
        near, far = echo_call(speech_clip("bot_answer_en.wav"), 110.0, 20.0, seed=5)
        near = near.astype(np.float64)
    else:
        far = np.zeros(24000, dtype=np.int16)
        near = line_noise(len(far), NOISE_RMS, np.random.default_rng(5))
    start = 20000
    near[start:start + len(click)] += click
    assert not any(analysis.onset for analysis in run_call(to_int16(near), far, bot_audible=during_echo))


def test_with_no_far_end_audio_the_reference_gate_judges_only_against_line_noise(speech_clip):
    gate = ReferenceEchoGate(min_rms=200.0)
    silence = np.zeros(FRAME, dtype=np.int16)
    noise = to_int16(line_noise(FRAME * 50, NOISE_RMS, np.random.default_rng(6)))
    assert not any(gate.accepts(frame, silence, bot_audible=True) for frame in frames(noise))
    speech = speech_clip("caller_question_en.wav")[FRAME * 3:FRAME * 18]
    assert all(gate.accepts(frame, silence, bot_audible=True) for frame in frames(speech))


def test_rms_gate_is_the_seed_rule():
    gate = RmsEchoGate(min_rms=200.0)
    quiet = np.full(FRAME, 150, dtype=np.int16)
    loud = np.full(FRAME, -250, dtype=np.int16)
    silence = np.zeros(FRAME, dtype=np.int16)
    assert gate.accepts(quiet, silence, bot_audible=False)
    assert not gate.accepts(quiet, silence, bot_audible=True)
    assert gate.accepts(loud, silence, bot_audible=True)


def test_make_echo_gate_builds_each_mode_and_refuses_others():
    assert isinstance(make_echo_gate("reference", 200.0), ReferenceEchoGate)
    assert make_echo_gate("rms", 150.0).min_rms == 150.0
    with pytest.raises(ValueError, match="'reference', 'rms'.*'geigel'"):
        make_echo_gate("geigel", 200.0)


def test_analysis_carries_the_decoded_frame_and_its_level():
    pcm = np.full(FRAME, 1000, dtype=np.int16)
    payload = ulaw_encode(pcm).tobytes()
    analyzer = InboundFrameAnalyzer("reference", 200.0, 2, 6, 350)
    analysis = analyzer.analyze(payload, None, bot_audible=False, now_ms=0.0)
    np.testing.assert_array_equal(analysis.pcm, ulaw_decode(ulaw_encode(pcm)))
    assert analysis.rms == pytest.approx(float(np.abs(analysis.pcm[0])), rel=1e-9)
    with pytest.raises(AttributeError):
        analysis.onset = True


@pytest.mark.parametrize("payload_bytes", [0, 159, 320])
def test_a_payload_that_is_not_one_frame_is_refused(payload_bytes):
    analyzer = InboundFrameAnalyzer("reference", 200.0, 2, 6, 350)
    with pytest.raises(ValueError, match=f"160 bytes.*got {payload_bytes}"):
        analyzer.analyze(b"\xff" * payload_bytes, None, bot_audible=False, now_ms=0.0)


def onsets_ms(near: np.ndarray, far: np.ndarray) -> list[float]:
    return [20.0 * index for index, analysis in enumerate(run_call(near, far, bot_audible=True)) if analysis.onset]


@pytest.mark.parametrize("caller_clip", ["caller_interrupt_en.wav", "caller_interrupt_he.wav"])
def test_on_a_line_without_echo_a_caller_10_db_under_a_loud_bot_fires_at_the_floor(speech_clip, caller_clip):
    bot = speech_clip("bot_answer_en.wav").astype(np.float64)
    caller = speech_clip(caller_clip).astype(np.float64)
    caller *= active_speech_rms(bot) / active_speech_rms(caller) * 10.0 ** (-10.0 / 20.0)
    caller_at = int(1.5 * 8000)
    # A 4-wire leg: nothing of the bot comes back, only line noise and the caller.
    near = line_noise(len(bot), NOISE_RMS, np.random.default_rng(7))
    near[caller_at:caller_at + len(caller)] += caller[: len(bot) - caller_at]
    onsets = onsets_ms(to_int16(near), to_int16(bot))
    # The floor: the same line with nothing playing fires as soon as the caller has six voiced frames.
    unopposed = onsets_ms(to_int16(near), np.zeros(len(bot), dtype=np.int16))
    assert onsets, "the quiet caller on a clean line was never detected"
    # The worst case assumed before learning the line cost seconds here; now at most a frame.
    assert unopposed[0] <= onsets[0] <= unopposed[0] + 20.0


def onsets_with_and_without_the_bot(bot, delay_ms: float, erl_db: float, caller, caller_at_s: float):
    """Onsets from the caller's start, over the bot's echo and with nothing playing (same line noise)."""
    near, far = echo_call(bot, delay_ms, erl_db, 11, caller, caller_at_s)
    alone, _ = echo_call(np.zeros(len(bot)), delay_ms, erl_db, 11, caller, caller_at_s)
    unopposed = [onset for onset in onsets_ms(alone, np.zeros(len(alone), dtype=np.int16)) if onset >= 1000.0 * caller_at_s]
    return [onset for onset in onsets_ms(near, far) if onset >= 1000.0 * caller_at_s], unopposed


@pytest.mark.parametrize("delay_ms", [35.0, 80.0, 215.0])
def test_the_canceller_is_at_work_within_the_first_second_and_a_half_of_an_echoing_line(speech_clip, delay_ms):
    # 600 ms of line noise, then the first answer: no greeting taught the gate this 10 dB hybrid.
    bot = np.concatenate([np.zeros(4800), speech_clip("bot_answer_en.wav").astype(np.float64)])
    caller = load_wav(VOICES / "caller_wait_he_m.wav").astype(np.float64)
    caller *= active_speech_rms(bot) / active_speech_rms(caller)
    caller_at_s = 0.6 + 1.5
    onsets, unopposed = onsets_with_and_without_the_bot(bot, delay_ms, 10.0, caller, caller_at_s)
    # The filter cancels after a few echo-only frames: waiting for half a second of them cost 0.4-1 s here.
    assert onsets and onsets[0] <= unopposed[0] + 40.0


@pytest.mark.parametrize(("caller_level_db", "caller_at_s", "delay_ms"), [
    (-10.0, 3.0, 0.0), (-10.0, 3.0, 80.0), (-6.0, 1.5, 80.0), (-6.0, 3.0, 0.0)])
def test_a_quiet_caller_whose_first_word_dips_under_loud_echo_twice_is_heard_at_that_word(
        speech_clip, caller_level_db, caller_at_s, delay_ms):
    # After the greeting, a 6 dB hybrid; the caller's "rega" has two soft stretches the echo of loud syllables hides.
    greeting = speech_clip("bot_greeting_en.wav").astype(np.float64)
    answer = speech_clip("bot_answer_en.wav").astype(np.float64)
    bot = np.concatenate([greeting, np.zeros(8000), answer])
    caller = load_wav(VOICES / "caller_wait_he_m.wav").astype(np.float64)
    caller *= active_speech_rms(answer) / active_speech_rms(caller) * 10.0 ** (caller_level_db / 20.0)
    at_s = (len(greeting) + 8000) / 8000 + caller_at_s
    onsets, unopposed = onsets_with_and_without_the_bot(bot, delay_ms, 6.0, caller, at_s)
    # Bridging one masked frame a run, the onset waited for the caller's next word: 440-860 ms later.
    assert onsets and onsets[0] <= unopposed[0] + 40.0


def test_a_greeting_without_echo_teaches_the_gate_there_is_none(speech_clip):
    greeting = speech_clip("bot_greeting_en.wav").astype(np.float64)
    near = to_int16(line_noise(len(greeting), NOISE_RMS, np.random.default_rng(8)))
    gate = ReferenceEchoGate(min_rms=200.0)
    assert gate.bound.gain_db.max() == pytest.approx(-6.0)
    for near_frame, far_frame in zip(frames(near), frames(to_int16(greeting))):
        gate.accepts(near_frame, far_frame, bot_audible=True)
    assert gate.echo_delay_ms is None
    # At every delay the line stayed at its noise floor while the bot spoke: the echo is bounded near it.
    assert gate.bound.gain_db.max() < -30.0


def test_a_speakerphone_switched_on_after_the_greeting_costs_at_most_one_early_onset(speech_clip):
    greeting = speech_clip("bot_greeting_en.wav").astype(np.float64)
    answer = speech_clip("bot_answer_en.wav").astype(np.float64)
    gap = np.zeros(8000)
    far = np.concatenate([greeting, gap, answer, np.zeros(4000)])
    answer_at = len(greeting) + len(gap)
    quiet_leg = simulate_echo(np.concatenate([greeting, np.zeros(len(far) - len(greeting))]), 90.0, 30.0)
    loud_leg = simulate_echo(np.concatenate([np.zeros(answer_at), answer, np.zeros(4000)]), 110.0, 6.0, **NARROW_HYBRID)
    near = quiet_leg + loud_leg + line_noise(len(far), NOISE_RMS, np.random.default_rng(9))
    onsets = onsets_ms(to_int16(near), to_int16(far))
    assert len(onsets) <= 1
    assert all(onset < 1000.0 * answer_at / 8000 + 2000.0 for onset in onsets)


def test_the_model_hears_the_quiet_syllables_of_a_caller_talking_over_loud_echo(speech_clip):
    bot = speech_clip("bot_answer_en.wav")
    caller = speech_clip("caller_question_en.wav").astype(np.float64)
    echo_level = active_speech_rms(simulate_echo(bot.astype(np.float64), 110.0, 6.0))
    caller *= echo_level / active_speech_rms(caller)
    near, far = echo_call(bot, 110.0, 6.0, seed=10, caller=caller, caller_at_s=3.0)
    analyses = run_call(near, far, bot_audible=True)
    span = slice(150, 150 + len(caller) // FRAME)
    caller_frames = [analysis for analysis in analyses[span] if analysis.voiced]
    gate_passed = sum(analysis.passes_gate for analysis in caller_frames)
    heard = sum(analysis.caller_audio for analysis in caller_frames)
    # The gate alone drops the syllables the echo hides; the hangover after the caller's frames keeps them.
    assert heard >= 0.8 * len(caller_frames) and heard > gate_passed


def test_a_long_caller_over_the_bot_on_a_clean_line_is_no_evidence_of_echo(speech_clip):
    bot = speech_clip("bot_answer_en.wav").astype(np.float64)
    caller = speech_clip("caller_question_en.wav").astype(np.float64)
    caller *= active_speech_rms(bot) / active_speech_rms(caller)
    near = line_noise(len(bot), NOISE_RMS, np.random.default_rng(11))
    start = 2 * 8000
    for repeat in range(3):
        at = start + repeat * len(caller)
        near[at:at + len(caller)] += caller[: len(near) - at]
    gate = ReferenceEchoGate(min_rms=200.0)
    for near_frame, far_frame in zip(frames(to_int16(near)), frames(to_int16(bot))):
        gate.accepts(near_frame, far_frame, bot_audible=True)
    # Seconds of the caller's voice while the bot spoke: neither an echo path nor a raised bound came of it.
    assert gate.echo_delay_ms is None
    assert gate.bound.gain_db.max() < -25.0


def greeting_then_answer(speech_clip, greeting_delay_ms: float, answer_delay_ms: float, erl_db: float, seed: int):
    greeting = speech_clip("bot_greeting_en.wav").astype(np.float64)
    answer = speech_clip("bot_answer_en.wav").astype(np.float64)
    gap = np.zeros(8000)
    answer_at = len(greeting) + len(gap)
    far = np.concatenate([greeting, gap, answer])
    played_greeting = np.concatenate([greeting, np.zeros(len(far) - len(greeting))])
    played_answer = np.concatenate([np.zeros(answer_at), answer])
    near = (simulate_echo(played_greeting, greeting_delay_ms, erl_db) + simulate_echo(played_answer, answer_delay_ms, erl_db)
            + line_noise(len(far), NOISE_RMS, np.random.default_rng(seed)))
    return to_int16(near), to_int16(far), answer_at // FRAME


def frames_until_confirmed(near: np.ndarray, far: np.ndarray, answer_frame: int) -> tuple[int | None, ReferenceEchoGate]:
    gate = ReferenceEchoGate(min_rms=200.0)
    for index, (near_frame, far_frame) in enumerate(zip(frames(near), frames(far))):
        gate.accepts(near_frame, far_frame, bot_audible=True)
        if index > answer_frame and gate.path is not None and gate.path.confirmed:
            return index - answer_frame, gate
    return None, gate


def test_an_echo_delay_that_did_not_move_is_confirmed_within_a_few_frames_of_the_next_response(speech_clip):
    near, far, answer_frame = greeting_then_answer(speech_clip, 120.0, 120.0, 10.0, seed=12)
    frames_taken, gate = frames_until_confirmed(near, far, answer_frame)
    # The filter still cancels at the old delay: no need to wait 300 ms for an estimate.
    assert frames_taken is not None and frames_taken <= 6 + 120 // 20
    assert frames_taken == 8  # these clips and this noise: the echo's arrival, then three frames cancelled
    assert gate.echo_delay_ms == pytest.approx(120.0, abs=5.0)


def test_an_echo_delay_moved_by_jitter_is_placed_again_as_soon_as_the_response_allows(speech_clip):
    near, far, answer_frame = greeting_then_answer(speech_clip, 120.0, 155.0, 10.0, seed=13)
    frames_taken, gate = frames_until_confirmed(near, far, answer_frame)
    # No waiting 300 ms for an estimate: the filter kept from the greeting cancels at the moved delay.
    assert frames_taken is not None and frames_taken <= 155 // 20 + 6
    assert frames_taken == 11  # these clips: the echo's arrival, then three frames the filter cancels there
    assert gate.echo_delay_ms == pytest.approx(155.0, abs=5.0)


def test_a_stop_consonant_under_loud_echo_does_not_restart_the_onset(speech_clip):
    # "Rega, rega": two 200 ms words, each with a stop that a loud syllable of the bot can hide.
    caller = load_wav(VOICES / "caller_wait_he_m.wav").astype(np.float64)
    near, far, answer_frame = greeting_then_answer(speech_clip, 150.0, 150.0, 10.0, seed=14)
    bot_level = active_speech_rms(speech_clip("bot_answer_en.wav").astype(np.float64))
    caller *= bot_level / active_speech_rms(caller) * 10.0 ** (-6.0 / 20.0)
    barge_in = (answer_frame + 75) * FRAME
    line = near.astype(np.float64)
    line[barge_in:barge_in + len(caller)] += caller
    onsets = [20.0 * index for index, analysis in enumerate(run_call(to_int16(line), far, bot_audible=True)) if analysis.onset]
    barge_in_ms = 1000.0 * barge_in / 8000
    assert onsets and onsets[0] > barge_in_ms
    # Within the first word (the next one starts 430 ms in).
    assert onsets[0] - barge_in_ms <= 260.0


def test_the_learned_bound_covers_every_frame_of_a_coloured_echo(speech_clip):
    # Until a path is measured the bound alone stands between the bot's echo and a barge-in.
    far = speech_clip("bot_answer_en.wav").astype(np.float64)
    near = simulate_echo(far, 100.0, 20.0, **NARROW_HYBRID) + line_noise(len(far), NOISE_RMS, np.random.default_rng(15))
    bound = EchoBound(delay_count=61, prior_gain_db=-6.0)
    noise_energy = NOISE_RMS**2
    covered = []
    for start in range(61 * 40, len(far) - FRAME, FRAME):
        far_by_delay = np.array([np.mean(far[start - 40 * step:start - 40 * step + FRAME] ** 2) for step in range(61)])
        near_energy = float(np.mean(near[start:start + FRAME] ** 2))
        if start >= 8000 and near_energy > 4 * noise_energy:
            covered.append(near_energy <= 10 ** 0.25 * (bound.predicted_echo(far_by_delay) + noise_energy))
        bound.learn(near_energy, noise_energy, far_by_delay)
    assert len(covered) > 200
    assert np.mean(covered) >= 0.99
    # And it is far under the worst case: a caller 10 dB under the bot is heard over it.
    assert bound.gain_db.max() < -6.0 - 6.0


def test_loud_echo_on_a_line_that_had_none_costs_at_most_one_early_onset(speech_clip):
    # A clean greeting teaches "no echo"; then the caller's phone starts echoing the answer at 6 dB.
    near, far, answer_frame = greeting_then_answer(speech_clip, 100.0, 100.0, 6.0, seed=16)
    greeting_frames = len(speech_clip("bot_greeting_en.wav")) // FRAME
    line = near.astype(np.float64)
    clean = line_noise(greeting_frames * FRAME, NOISE_RMS, np.random.default_rng(16))
    line[: len(clean)] = clean
    analyses = run_call(to_int16(line), far, bot_audible=True)
    onsets = [index for index, analysis in enumerate(analyses) if analysis.onset]
    # The bound was right to say "no echo" then; the echo passing for the caller is placed twice at one
    # delay and adopted, though much of the window passed: one early onset at most, none after 2 s.
    assert len(onsets) <= 1 and all(index < answer_frame + 100 for index in onsets)


def test_the_rms_mode_keeps_the_seeds_strictly_consecutive_onset():
    assert InboundFrameAnalyzer("rms", 200.0, 2, 6, 350).voice_onset.masked_frames_bridged == 0
    assert InboundFrameAnalyzer("reference", 200.0, 2, 6, 350).voice_onset.masked_frames_bridged == 2


def test_a_caller_echoing_the_bots_words_on_a_clean_line_is_not_taken_for_an_echo_path(speech_clip):
    # Someone near the caller repeats a second of what the bot says: correlated with the far end at one
    # delay, but far louder than this line has shown it echoes there.
    far = speech_clip("bot_answer_en.wav").astype(np.float64)
    near = line_noise(len(far), NOISE_RMS, np.random.default_rng(17))
    start, delay = 4 * 8000, 1200
    near[start:start + 6000] += 0.7 * far[start - delay:start - delay + 6000]
    gate = ReferenceEchoGate(min_rms=200.0)
    for near_frame, far_frame in zip(frames(to_int16(near)), frames(to_int16(far))):
        gate.accepts(near_frame, far_frame, bot_audible=True)
    assert gate.echo_delay_ms is None


def test_seconds_of_double_talk_on_an_echoing_line_leave_its_echo_path_alone(speech_clip):
    bot = speech_clip("bot_answer_en.wav").astype(np.float64)
    caller = speech_clip("caller_question_en.wav").astype(np.float64)
    caller *= active_speech_rms(bot) / active_speech_rms(caller) * 2.0
    near = simulate_echo(bot, 120.0, 10.0) + line_noise(len(bot), NOISE_RMS, np.random.default_rng(18))
    start = 4 * 8000
    near[start:start + len(caller)] += caller[: len(near) - start]
    gate = ReferenceEchoGate(min_rms=200.0)
    paths = []
    for index, (near_frame, far_frame) in enumerate(zip(frames(to_int16(near)), frames(to_int16(bot)))):
        gate.accepts(near_frame, far_frame, bot_audible=True)
        if start // FRAME <= index < (start + len(caller)) // FRAME:
            paths.append(gate.path)
    # Whatever the caller's voice correlates with, the delay and the echo's level stay what the line showed.
    assert all(path is not None and abs(path.delay_blocks * 5.0 - 120.0) <= 10.0 for path in paths)
    assert all(abs(10.0 * np.log10(path.gain) + 10.0) <= 3.0 for path in paths)


def speech_like_envelope(blocks: int, seed: int) -> np.ndarray:
    """Block energies that come and go as speech does: talkspurts of varying level and silent gaps."""
    rng = np.random.default_rng(seed)
    levels = np.repeat(rng.uniform(1e3, 1e7, blocks // 10 + 1), 10)[:blocks]
    return levels * (rng.uniform(size=blocks) < 0.8) * rng.uniform(0.5, 1.5, blocks)


@pytest.mark.parametrize("delay_blocks", [0, 7, 33, 60])
def test_the_echo_path_is_placed_at_its_delay_with_its_gain(delay_blocks):
    far = speech_like_envelope(260, seed=delay_blocks)
    near = 0.05 * far[60 - delay_blocks:260 - delay_blocks]
    assert estimate_echo_path(near, far, 0.6) == (delay_blocks, pytest.approx(0.05))


def test_the_echo_gain_is_the_upper_quartile_of_the_block_ratios():
    far = speech_like_envelope(260, seed=1)
    gains = np.tile([0.01, 0.02, 0.03, 0.04], 50)
    delay, gain = estimate_echo_path(gains * far[50:250], far, 0.6)
    assert delay == 10 and gain == pytest.approx(0.04)


def test_no_echo_path_is_placed_from_a_flat_envelope_or_an_unrelated_one():
    far = speech_like_envelope(260, seed=2)
    assert estimate_echo_path(np.zeros(200), far, 0.6) is None  # digital silence on the line
    assert estimate_echo_path(np.full(200, 5e4), far, 0.6) is None  # a steady tone
    assert estimate_echo_path(0.05 * far[30:230], np.full(260, 5e4), 0.6) is None
    assert estimate_echo_path(speech_like_envelope(200, seed=3), far, 0.6) is None


def test_no_echo_path_is_placed_when_the_far_end_spoke_in_under_a_fifth_of_the_window():
    bursts = 1e6 * np.random.default_rng(4).uniform(0.5, 1.5, 50)
    far = np.zeros(260)
    far[100:130] = bursts[:30]  # 30 active blocks of the aligned 200: 15 %
    assert estimate_echo_path(0.05 * far[60:260], far, 0.6) is None
    far[100:140] = bursts[:40]  # exactly a fifth: enough
    assert estimate_echo_path(0.05 * far[60:260], far, 0.6) == (0, pytest.approx(0.05))
    far[100:150] = bursts  # 25 %
    assert estimate_echo_path(0.05 * far[60:260], far, 0.6) == (0, pytest.approx(0.05))


def test_the_accepted_count_is_the_number_of_frames_accepted_in_the_last_second(speech_clip):
    bot = speech_clip("bot_answer_en.wav")
    caller = 0.5 * speech_clip("caller_question_en.wav")
    near, far = echo_call(bot, 60.0, 20.0, seed=11, caller=caller, caller_at_s=1.0)
    gate = ReferenceEchoGate(min_rms=200.0)
    history = []
    for near_frame, far_frame in zip(frames(near), frames(far)):
        history.append(gate.accepts(near_frame, far_frame, True))
        assert gate.accepted_count == sum(history[-50:])
    assert max(sum(history[end - 50:end]) for end in range(50, len(history))) > 10


def estimate_frames(gate: ReferenceEchoGate, near: np.ndarray, far: np.ndarray) -> tuple[list[int], list]:
    """The frames on which the gate estimated the echo path, and its path after each frame."""
    estimated, paths = [], []
    estimate = gate._estimate

    def counted() -> None:
        estimated.append(len(paths))
        estimate()

    gate._estimate = counted
    for near_frame, far_frame in zip(frames(near), frames(far)):
        gate.accepts(near_frame, far_frame, True)
        paths.append(gate.path)
    return estimated, paths


def test_the_path_is_searched_every_100_ms_until_placed_then_checked_once_a_second(speech_clip):
    answer = speech_clip("bot_answer_en.wav")
    gap = np.zeros(4000, dtype=answer.dtype)  # 0.5 s: the delay may have moved meanwhile
    bot = np.concatenate([answer, gap, speech_clip("bot_greeting_en.wav"), np.zeros(16000, dtype=answer.dtype)])
    near, far = echo_call(bot, 60.0, 20.0, seed=3)
    estimated, paths = estimate_frames(ReferenceEchoGate(min_rms=200.0), near, far)
    talkspurt = (len(answer) + len(gap)) // FRAME
    last_far_frame = max(index for index, frame in enumerate(frames(far)) if np.any(frame))
    # The first second fills the window; two agreeing estimates 100 ms apart place the path.
    assert estimated[:3] == [49, 54, 59] and paths[53] is None and paths[54].confirmed
    # Settled: once a second, until the far end's silence, then 300 ms into the next talkspurt, then once a
    # second until the far end has been silent for a second.
    after_the_gap = [frame for frame in range(talkspurt + 14, len(paths), 50) if frame - last_far_frame < 50]
    assert estimated[3:] == [*range(109, talkspurt, 50), *after_the_gap]
    assert not paths[talkspurt].confirmed and paths[talkspurt + 14].confirmed


def test_a_line_the_greeting_showed_to_be_quiet_is_not_searched_for_a_path(speech_clip):
    bot = np.concatenate([speech_clip("bot_answer_en.wav"), speech_clip("bot_greeting_en.wav")])
    near, far = echo_call(bot, 60.0, 60.0, seed=3)
    estimated, paths = estimate_frames(ReferenceEchoGate(min_rms=200.0), near, far)
    assert estimated == list(range(49, len(paths), 50)) and paths[-1] is None


def test_digital_silence_is_never_the_caller(speech_clip):
    gate = ReferenceEchoGate(min_rms=200.0)
    silence = np.zeros(FRAME, dtype=np.int16)
    assert not any(gate.accepts(silence, silence, True) for _ in range(100))
    bot = speech_clip("bot_answer_en.wav")
    assert not any(gate.accepts(silence, far_frame, True) for far_frame in frames(bot)[:100])


def test_the_seed_rule_takes_a_frame_at_exactly_the_minimum_level():
    gate = RmsEchoGate(min_rms=200.0)
    silence = np.zeros(FRAME, dtype=np.int16)
    assert gate.accepts(np.full(FRAME, 200, dtype=np.int16), silence, True)
    assert not gate.accepts(np.full(FRAME, 199, dtype=np.int16), silence, True)


@pytest.mark.parametrize("answer_delay_ms", [75.0, 165.0])
def test_while_a_moved_delay_is_unconfirmed_its_echo_is_never_taken_for_the_caller(speech_clip, answer_delay_ms):
    near, far, answer_frame = greeting_then_answer(speech_clip, 120.0, answer_delay_ms, 6.0, seed=14)
    gate = ReferenceEchoGate(min_rms=200.0)
    accepted = [gate.accepts(near_frame, far_frame, True) for near_frame, far_frame in zip(frames(near), frames(far))]
    assert gate.echo_delay_ms == pytest.approx(answer_delay_ms, abs=5.0)
    assert sum(accepted[answer_frame:]) == 0


def test_at_the_same_delay_the_echo_gain_falls_by_at_most_3_db_an_estimate():
    gate = ReferenceEchoGate(min_rms=200.0)
    gate._adopt(EchoPath(40, 0.1))
    gate._adopt(EchoPath(41, 0.01))  # within the spread: the same delay, a coloured echo swinging low
    assert gate.path == EchoPath(41, pytest.approx(0.05))
    gate._adopt(EchoPath(41, 0.08))
    assert gate.path.gain == pytest.approx(0.08)
    gate._adopt(EchoPath(60, 0.01))  # a new delay: its own gain
    assert gate.path == EchoPath(60, pytest.approx(0.01))


@pytest.mark.parametrize(("clip", "erl_db", "delay_ms", "hybrid"), [
    ("bot_greeting_en.wav", 6.0, 20.0, {}), ("bot_greeting_en.wav", 10.0, 120.0, {}),
    ("bot_greeting_en.wav", 10.0, 120.0, NARROW_HYBRID), ("bot_answer_en.wav", 6.0, 250.0, NARROW_HYBRID),
])
def test_echo_of_a_words_start_or_end_is_never_taken_for_the_caller(
        speech_clip, clip, erl_db, delay_ms, hybrid):
    far = np.concatenate([speech_clip(clip), np.zeros(4000)]).astype(np.float64)
    near = simulate_echo(far, delay_ms, erl_db, **hybrid) + line_noise(len(far), NOISE_RMS, np.random.default_rng(5))
    gate = ReferenceEchoGate(min_rms=200.0)
    near, far = to_int16(near), to_int16(far)
    assert not any(gate.accepts(n, f, True) for n, f in zip(frames(near), frames(far)))


@pytest.mark.parametrize(("delay_blocks", "ratio", "starts_afresh"), [
    (40, 3.5, False), (40, 4.5, True), (41, 1 / 4.5, False), (42, 1.0, True)])
def test_the_filter_starts_afresh_for_an_echo_6_db_louder_or_at_a_new_delay(
        delay_blocks, ratio, starts_afresh, monkeypatch):
    gate = ReferenceEchoGate(min_rms=200.0)
    gate._adopt(EchoPath(40, 0.01))
    resets = []
    monkeypatch.setattr(gate.canceller, "reset", lambda: resets.append(True))
    gate._adopt(EchoPath(delay_blocks, 0.01 * ratio))
    assert bool(resets) is starts_afresh


def trimmed(clip: np.ndarray) -> np.ndarray:
    """The clip without its leading and trailing silent frames."""
    loud = [index for index, frame in enumerate(frames(clip)) if np.any(frame)]
    return clip[loud[0] * FRAME:(loud[-1] + 1) * FRAME]


@pytest.mark.parametrize(("gap_frames", "unconfirmed"), [(14, False), (15, True)])
def test_a_far_end_silence_of_300_ms_may_have_moved_the_delay(speech_clip, gap_frames, unconfirmed):
    answer, greeting = trimmed(speech_clip("bot_answer_en.wav")), trimmed(speech_clip("bot_greeting_en.wav"))
    talkspurt = len(answer) // FRAME + gap_frames
    bot = np.concatenate([answer, np.zeros(gap_frames * FRAME, dtype=answer.dtype), greeting])
    near, far = echo_call(bot, 60.0, 20.0, seed=3)
    _, paths = estimate_frames(ReferenceEchoGate(min_rms=200.0), near, far)
    assert paths[talkspurt - 1].confirmed and paths[talkspurt].confirmed is not unconfirmed


def test_a_line_looping_the_bot_back_at_full_level_is_measured_as_a_0_db_echo(speech_clip):
    bot = np.concatenate([speech_clip("bot_answer_en.wav"), np.zeros(4000, dtype=np.int16)])
    looped = np.concatenate([np.zeros(480, dtype=np.int16), bot])[:len(bot)]  # the same samples, 60 ms later
    gate = ReferenceEchoGate(min_rms=200.0)
    for near_frame, far_frame in zip(frames(looped), frames(bot)):
        gate.accepts(near_frame, far_frame, True)
    assert (gate.echo_delay_ms, gate.echo_return_loss_db) == (60.0, pytest.approx(0.0, abs=1e-9))


def test_on_a_noisy_line_a_weak_echo_is_placed_at_its_delay_from_where_it_rises_out_of_the_noise(speech_clip):
    bot = np.concatenate([speech_clip("bot_answer_en.wav"), speech_clip("bot_greeting_he.wav")]).astype(np.float64)
    far = np.concatenate([bot, np.zeros(4000)])
    near = to_int16(simulate_echo(far, 150.0, 30.0) + line_noise(len(far), 300.0, np.random.default_rng(2)))
    gate = ReferenceEchoGate(min_rms=200.0)
    for near_frame, far_frame in zip(frames(near), frames(to_int16(far))):
        gate.accepts(near_frame, far_frame, True)
    # The far envelope is floored where its echo sinks into the noise: quiet starts do not pull the delay.
    assert gate.echo_delay_ms == 150.0
    assert gate.echo_return_loss_db >= 18.0  # the noise inflates the measured echo, but not by more than 12 dB


def test_an_echo_switched_24_db_louder_mid_answer_is_believed_at_once_and_confirmed_later(speech_clip):
    answer = speech_clip("bot_answer_en.wav")
    far = np.concatenate([answer, speech_clip("bot_greeting_he.wav"), np.zeros(4000, dtype=answer.dtype)])
    switch = len(answer) // 2
    before = np.concatenate([far[:switch], np.zeros(len(far) - switch)]).astype(np.float64)
    after = np.concatenate([np.zeros(switch), far[switch:]]).astype(np.float64)
    near = (simulate_echo(before, 90.0, 30.0) + simulate_echo(after, 90.0, 6.0)
            + line_noise(len(far), NOISE_RMS, np.random.default_rng(9)))
    _, paths = estimate_frames(ReferenceEchoGate(min_rms=200.0), to_int16(near), far)
    raised = next(index for index, path in enumerate(paths) if path is not None and path.gain > 0.1)
    # A speakerphone: the louder echo is believed while the caller seems to talk, but its delay is only
    # confirmed once the line is heard without the caller.
    assert raised - switch // FRAME < 50 and not paths[raised].confirmed
    assert paths[-1].confirmed and paths[-1].delay_blocks == 18


@pytest.mark.parametrize(("caller_rms", "accepted"), [(150, False), (200, True)])
def test_while_the_delay_is_unconfirmed_the_caller_must_also_reach_min_rms(speech_clip, caller_rms, accepted):
    answer, greeting = trimmed(speech_clip("bot_answer_en.wav")), trimmed(speech_clip("bot_greeting_en.wav"))
    talkspurt = len(answer) // FRAME + 25
    far = np.concatenate([answer, np.zeros(25 * FRAME, dtype=answer.dtype), greeting])
    near, far = echo_call(far, 60.0, 20.0, seed=3)
    square = np.where(np.arange(FRAME) % 2, caller_rms, -caller_rms).astype(np.int16)  # exactly caller_rms
    near = near.copy()
    near[talkspurt * FRAME:(talkspurt + 1) * FRAME] = square  # the talkspurt's first frame: no echo yet
    gate = ReferenceEchoGate(min_rms=200.0)
    verdicts = [gate.accepts(n, f, True) for n, f in zip(frames(near), frames(far))]
    assert gate.path is not None and verdicts[talkspurt] is accepted
