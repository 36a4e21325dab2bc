"""Shared fixtures."""

from __future__ import annotations

import pytest

from app.clips import load_clip


@pytest.fixture
def speech_clip():
    """Load a packaged speech clip by file name, as int16 samples at 8 kHz."""
    return load_clip
