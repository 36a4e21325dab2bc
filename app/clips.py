"""The packaged speech clips: the local model's canned answers and the simulated caller's voice."""

from __future__ import annotations

import wave
from importlib import resources

import numpy as np

CLIP_SAMPLE_RATE_HZ = 8000


def load_clip(name: str) -> np.ndarray:
    """A packaged 8 kHz mono clip as int16 samples, e.g. ``load_clip("bot_greeting_en.wav")``."""
    with resources.files("app.assets").joinpath(name).open("rb") as handle, wave.open(handle, "rb") as clip:
        if (clip.getframerate(), clip.getnchannels(), clip.getsampwidth()) != (CLIP_SAMPLE_RATE_HZ, 1, 2):
            raise ValueError(f"clip {name} must be 8 kHz mono 16-bit PCM")
        return np.frombuffer(clip.readframes(clip.getnframes()), dtype="<i2").astype(np.int16)
