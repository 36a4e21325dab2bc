"""Echo gates and the inbound path on echo scenarios built from the real clips."""

from __future__ import annotations

import numpy as np
import pytest

from dsp.echo import ReferenceEchoGate, RmsEchoGate, make_echo_gate
from dsp.echo_path import active_speech_rms, line_noise, simulate_echo, to_int16
from dsp.g711 import ulaw_decode, ulaw_encode
from dsp.inbound import FrameAnalysis, InboundFrameAnalyzer

FRAME = 160
NOISE_RMS = 30.0
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
@pytest.mark.parametrize(("clip", "delay_ms"), [("bot_greeting_en.wav", 30.0), ("bot_answer_en.wav", 180.0), ("bot_greeting_he.wav", 280.0)])
def test_echo_alone_is_never_accepted_in_reference_mode(speech_clip, clip, delay_ms, erl_db):
    near, far = echo_call(speech_clip(clip), delay_ms, erl_db, seed=int(delay_ms + erl_db))
    analyses = run_call(near, far, bot_audible=True)
    assert not any(analysis.passes_gate for analysis in analyses)
    assert not any(analysis.caller_audio for analysis in analyses)
    assert not any(analysis.onset for analysis in analyses)


def test_the_seed_rule_lets_loud_echo_through(speech_clip):
    # Why the reference gate exists: at 10 dB return loss the rms rule fires on the bot's own voice.
    near, far = echo_call(speech_clip("bot_answer_en.wav"), 100.0, 10.0, seed=1)
    assert any(analysis.onset for analysis in run_call(near, far, bot_audible=True, gate_mode="rms"))


def test_reference_gate_measures_the_echo_path(speech_clip):
    near, far = echo_call(speech_clip("bot_answer_en.wav"), 120.0, 10.0, seed=2)
    gate = ReferenceEchoGate()
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
    gate = ReferenceEchoGate()
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


def test_a_greeting_without_echo_teaches_the_gate_there_is_none(speech_clip):
    greeting = speech_clip("bot_greeting_en.wav").astype(np.float64)
    near = to_int16(line_noise(len(greeting), NOISE_RMS, np.random.default_rng(8)))
    gate = ReferenceEchoGate()
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
