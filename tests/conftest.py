"""Shared fixtures."""

from __future__ import annotations

import pytest
from hypothesis import settings

from app.clips import load_clip
from tests.storage_fixtures import shared_migrated_postgres_url  # noqa: F401 (a session fixture: one for every module)

# No per-example deadline: on a loaded shared machine a slow example is not a failure.
settings.register_profile("callgate", deadline=None)
settings.load_profile("callgate")


@pytest.fixture
def speech_clip():
    """Load a packaged speech clip by file name, as int16 samples at 8 kHz."""
    return load_clip
