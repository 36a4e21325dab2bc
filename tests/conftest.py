"""Shared fixtures: the packaged speech clips and settings."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest

ASSETS = Path(__file__).resolve().parent.parent / "app" / "assets"


def load_clip(name: str) -> np.ndarray:
    """A packaged 8 kHz mono int16 speech clip."""
    with wave.open(str(ASSETS / name), "rb") as clip:
        assert clip.getframerate() == 8000 and clip.getnchannels() == 1 and clip.getsampwidth() == 2
        return np.frombuffer(clip.readframes(clip.getnframes()), dtype="<i2").astype(np.int16)


@pytest.fixture
def speech_clip():
    return load_clip
