"""G.711 codecs: bit-exact against the stdlib reference on every input, and round trips."""

from __future__ import annotations

import warnings

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dsp.g711 import ALAW_SILENCE, ULAW_SILENCE, alaw_decode, alaw_encode, ulaw_decode, ulaw_encode

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

ALL_INT16 = np.arange(-32768, 32768, dtype=np.int16)
ALL_CODES = np.arange(256, dtype=np.uint8)


def test_ulaw_encode_matches_reference_for_every_int16_value():
    expected = np.frombuffer(audioop.lin2ulaw(ALL_INT16.tobytes(), 2), dtype=np.uint8)
    np.testing.assert_array_equal(ulaw_encode(ALL_INT16), expected)


def test_ulaw_decode_matches_reference_for_every_code():
    expected = np.frombuffer(audioop.ulaw2lin(ALL_CODES.tobytes(), 2), dtype=np.int16)
    np.testing.assert_array_equal(ulaw_decode(ALL_CODES), expected)


def test_alaw_encode_matches_reference_for_every_int16_value():
    expected = np.frombuffer(audioop.lin2alaw(ALL_INT16.tobytes(), 2), dtype=np.uint8)
    np.testing.assert_array_equal(alaw_encode(ALL_INT16), expected)


def test_alaw_decode_matches_reference_for_every_code():
    expected = np.frombuffer(audioop.alaw2lin(ALL_CODES.tobytes(), 2), dtype=np.int16)
    np.testing.assert_array_equal(alaw_decode(ALL_CODES), expected)


def test_silence_codes_are_the_codes_of_zero():
    zero = np.zeros(1, dtype=np.int16)
    assert ulaw_encode(zero)[0] == ULAW_SILENCE == 0xFF
    assert alaw_encode(zero)[0] == ALAW_SILENCE
    assert ulaw_decode(np.array([ULAW_SILENCE], dtype=np.uint8))[0] == 0


def test_output_types_and_shapes_follow_the_input():
    frame = np.zeros((2, 160), dtype=np.int16)
    assert ulaw_encode(frame).dtype == np.uint8 and ulaw_encode(frame).shape == (2, 160)
    assert ulaw_decode(ulaw_encode(frame)).dtype == np.int16


@given(st.integers(0, 255))
def test_ulaw_codes_survive_decode_then_encode(code):
    # 0x7F is negative zero: it decodes to 0, which encodes as 0xFF.
    codes = np.array([code], dtype=np.uint8)
    again = ulaw_encode(ulaw_decode(codes))[0]
    assert again == code or (code == 0x7F and again == 0xFF)


@given(st.integers(0, 255))
def test_alaw_codes_survive_decode_then_encode(code):
    codes = np.array([code], dtype=np.uint8)
    assert alaw_encode(alaw_decode(codes))[0] == code


@given(arrays(np.int16, st.integers(1, 400)))
def test_ulaw_round_trip_stays_within_one_step_of_the_input(pcm):
    codes = ulaw_encode(pcm)
    decoded = ulaw_decode(codes).astype(np.int64)
    step = 8 << ((~codes.astype(np.int64) & 0x70) >> 4)
    # Beyond +-32124 mu-law clips to its largest code.
    assert np.all(np.abs(decoded - np.clip(pcm, -32124, 32124)) <= step)
    np.testing.assert_array_equal(ulaw_encode(ulaw_decode(codes)), codes)


@given(arrays(np.int16, st.integers(1, 400)))
def test_alaw_round_trip_stays_within_one_step_of_the_input(pcm):
    codes = alaw_encode(pcm)
    decoded = alaw_decode(codes).astype(np.int64)
    segment = ((codes.astype(np.int64) ^ 0x55) & 0x70) >> 4
    step = 16 << np.maximum(segment - 1, 0)
    assert np.all(np.abs(decoded - np.clip(pcm, -32256, 32256)) <= step)
    np.testing.assert_array_equal(alaw_encode(alaw_decode(codes)), codes)
