"""Speech clips: the packaged ones (the local model's canned answers, the simulated caller's voice) and WAV files."""

from __future__ import annotations

import wave
from importlib import resources
from pathlib import Path
from typing import BinaryIO

import numpy as np

CLIP_SAMPLE_RATE_HZ = 8000


def load_clip(name: str) -> np.ndarray:
    """A packaged 8 kHz mono clip as int16 samples, e.g. ``load_clip("bot_greeting_en.wav")``."""
    with resources.files("app.assets").joinpath(name).open("rb") as handle:
        return _read_wav(handle, name)


def load_wav(path: str | Path) -> np.ndarray:
    """An 8 kHz mono 16-bit WAV file as int16 samples."""
    with open(path, "rb") as handle:
        return _read_wav(handle, str(path))


def _read_wav(handle: BinaryIO, name: str) -> np.ndarray:
    with wave.open(handle, "rb") as clip:
        if (clip.getframerate(), clip.getnchannels(), clip.getsampwidth()) != (CLIP_SAMPLE_RATE_HZ, 1, 2):
            raise ValueError(f"clip {name} must be 8 kHz mono 16-bit PCM")
        return np.frombuffer(clip.readframes(clip.getnframes()), dtype="<i2").astype(np.int16)
