"""The local model's energy VAD: threshold mapping and speech boundaries on the audio clock."""

from __future__ import annotations

import numpy as np
import pytest

from app.clips import load_clip
from app.realtime.local_vad import EnergyVad, SpeechStarted, SpeechStopped, rms_threshold


def tone(duration_ms: int, amplitude: float) -> np.ndarray:
    time_s = np.arange(duration_ms * 8) / 8000
    return (amplitude * np.sin(2 * np.pi * 440 * time_s)).astype(np.int16)


def silence(duration_ms: int) -> np.ndarray:
    return np.zeros(duration_ms * 8, dtype=np.int16)


def test_threshold_maps_onto_documented_rms_levels():
    assert rms_threshold(0.5) == pytest.approx(103.6, abs=0.5)
    assert rms_threshold(0.82) == pytest.approx(452, abs=2)
    levels = [rms_threshold(step / 10) for step in range(11)]
    assert levels == sorted(levels)


def test_speech_stops_after_the_silence_duration_on_the_audio_clock():
    vad = EnergyVad(threshold=0.5, silence_duration_ms=500)
    boundaries = vad.feed(np.concatenate((silence(100), tone(300, 3000), silence(1000))))
    assert boundaries == [SpeechStarted(onset_ms=100), SpeechStopped(audio_end_ms=100 + 300 + 500)]
    assert vad.clock_ms == 1400


def test_boundaries_do_not_depend_on_how_the_audio_is_chunked():
    clip = np.concatenate((silence(300), load_clip("caller_question_en.wav"), silence(1000)))
    whole = EnergyVad(threshold=0.82, silence_duration_ms=650).feed(clip)
    chunked_vad = EnergyVad(threshold=0.82, silence_duration_ms=650)
    chunked = [boundary for start in range(0, len(clip), 77) for boundary in chunked_vad.feed(clip[start : start + 77])]
    assert chunked == whole
    assert [type(boundary) for boundary in whole] == [SpeechStarted, SpeechStopped]


def test_a_higher_threshold_needs_louder_speech():
    quiet_speech = np.concatenate((tone(300, 400), silence(1000)))
    assert EnergyVad(threshold=0.5, silence_duration_ms=500).feed(quiet_speech)
    assert EnergyVad(threshold=1.0, silence_duration_ms=500).feed(quiet_speech) == []


def test_reset_forgets_the_utterance_but_keeps_the_clock():
    vad = EnergyVad(threshold=0.5, silence_duration_ms=500)
    vad.feed(tone(200, 3000))
    vad.reset()
    assert vad.feed(silence(1000)) == []
    assert vad.clock_ms == 1200
