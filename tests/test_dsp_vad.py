"""webrtcvad framing on the real clips, and the debounced onset detector."""

from __future__ import annotations

import numpy as np
import pytest

from dsp.vad import FrameVad, VoiceOnset


def frames(samples: np.ndarray) -> np.ndarray:
    count = len(samples) // 160
    return samples[: count * 160].reshape(count, 160)


def voiced_fraction(vad: FrameVad, samples: np.ndarray) -> float:
    return float(np.mean([vad.is_voiced(frame) for frame in frames(samples)]))


@pytest.mark.parametrize("clip", ["caller_question_en.wav", "caller_interrupt_he.wav", "bot_greeting_en.wav"])
def test_speech_clips_are_mostly_voiced(speech_clip, clip):
    assert voiced_fraction(FrameVad(2), speech_clip(clip)) > 0.6


@pytest.mark.parametrize("aggressiveness", [0, 1, 2, 3])
def test_silence_is_never_voiced(aggressiveness):
    assert voiced_fraction(FrameVad(aggressiveness), np.zeros(8000, dtype=np.int16)) == 0.0


def test_white_noise_is_rarely_voiced_at_the_default_aggressiveness():
    noise = np.random.default_rng(7).normal(0, 300, 16000).astype(np.int16)
    assert voiced_fraction(FrameVad(2), noise) < 0.1


def test_aggressiveness_is_the_one_asked_for():
    # Noisy speech-band audio: the least aggressive mode calls much more of it voice than the most.
    noise = np.random.default_rng(8).normal(0, 1000, 16000).astype(np.int16)
    assert voiced_fraction(FrameVad(0), noise) > voiced_fraction(FrameVad(3), noise) + 0.3


def test_float_frames_are_judged_as_their_int16_samples(speech_clip):
    vad = FrameVad(2)
    clip = speech_clip("caller_question_en.wav")
    assert [vad.is_voiced(frame.astype(np.float64)) for frame in frames(clip)] == [vad.is_voiced(frame) for frame in frames(clip)]


def test_bad_frames_and_settings_are_refused_clearly():
    with pytest.raises(ValueError, match="10, 20 or 30 ms"):
        FrameVad(2).is_voiced(np.zeros(100, dtype=np.int16))
    with pytest.raises(ValueError, match="aggressiveness"):
        FrameVad(4)
    with pytest.raises(ValueError, match="sample rate"):
        FrameVad(2, sample_rate_hz=11025)


def feed(onset: VoiceOnset, verdicts: str, start_ms: float = 0.0) -> list[float]:
    """Feed 'v' (qualifying) and '.' frames 20 ms apart; return the times at which it fired."""
    fired = []
    for index, verdict in enumerate(verdicts):
        now_ms = start_ms + 20.0 * index
        if onset.update(verdict == "v", now_ms):
            fired.append(now_ms)
    return fired


def test_fires_exactly_on_the_sixth_consecutive_voiced_frame():
    assert feed(VoiceOnset(6, 350), "vvvvvv") == [100.0]
    assert feed(VoiceOnset(6, 350), "vvvvv") == []


def test_a_gap_restarts_the_count():
    assert feed(VoiceOnset(6, 350), "vvvvv.vvvvv") == []
    assert feed(VoiceOnset(6, 350), "vvvvv.vvvvvv") == [220.0]


def test_continuous_voice_fires_once_per_debounce_plus_a_fresh_run():
    # Fires at 100 ms; rests until 450 ms; the fresh run is frames 460..560 ms.
    assert feed(VoiceOnset(6, 350), "v" * 40) == [100.0, 560.0]


def test_rearms_exactly_when_the_debounce_has_passed():
    onset = VoiceOnset(voice_frames=2, debounce_ms=100)
    assert onset.update(True, 0.0) is False
    assert onset.update(True, 20.0) is True
    assert onset.update(True, 119.0) is False
    assert onset.update(True, 120.0) is False
    assert onset.update(True, 140.0) is True


def test_voice_frames_must_be_positive():
    with pytest.raises(ValueError, match="voice_frames"):
        VoiceOnset(voice_frames=0, debounce_ms=350)


def feed_masked(onset: VoiceOnset, verdicts: str) -> list[float]:
    """Like `feed`, with 'm' for a voiced frame the echo gate could not tell from echo."""
    return [20.0 * index for index, verdict in enumerate(verdicts)
            if onset.update(verdict == "v", 20.0 * index, masked=verdict == "m")]


def test_one_masked_frame_inside_a_run_is_passed_over_but_not_counted():
    assert feed_masked(VoiceOnset(6, 350, masked_frames_bridged=1), "vvvvvmv") == [120.0]
    assert feed_masked(VoiceOnset(6, 350, masked_frames_bridged=1), "vvmvvvv") == [120.0]
    # The seed's rule: without bridging a masked frame restarts the count like any other.
    assert feed_masked(VoiceOnset(6, 350), "vvvvvmv") == []


def test_a_single_frame_run_fires_on_every_frame_once_rested():
    assert feed(VoiceOnset(1, 0), "vv.v") == [0.0, 20.0, 60.0]
    # After firing the run starts again from nothing.
    assert feed(VoiceOnset(2, 0), "vvvv") == [20.0, 60.0]


def test_two_masked_frames_are_bridged_where_two_are_allowed_and_not_a_third():
    assert feed_masked(VoiceOnset(6, 350, masked_frames_bridged=2), "vvmvmvvv") == [140.0]
    assert feed_masked(VoiceOnset(6, 350, masked_frames_bridged=2), "vvmvmvmvvv") == []


def test_bridging_never_strings_echo_together():
    # A second masked frame in the same run, or an unvoiced one: the count restarts.
    assert feed_masked(VoiceOnset(6, 350, masked_frames_bridged=1), "vvvmvvmvv") == []
    # A masked frame before any voice starts nothing and uses up nothing: the later one is still bridged.
    assert feed_masked(VoiceOnset(6, 350, masked_frames_bridged=1), "mvvvvvmv") == [140.0]
    assert feed_masked(VoiceOnset(6, 350, masked_frames_bridged=1), "vvvvv.v") == []
    # A frame given as not voiced, with nothing said of masking, is not masked.
    assert feed(VoiceOnset(6, 350, masked_frames_bridged=1), "vvvvv.v") == []
    assert feed_masked(VoiceOnset(6, 350, masked_frames_bridged=1), "vvvmvvmvvvvvv") == [240.0]
