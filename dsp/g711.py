"""ITU-T G.711 mu-law and A-law codecs, vectorised with lookup tables built once at import."""

from __future__ import annotations

import numpy as np

ULAW_SILENCE = 0xFF
"""The mu-law code of linear 0: what to send when there is nothing to say."""

ALAW_SILENCE = 0xD5
"""The A-law code of linear 0."""

_ULAW_BIAS = 0x84
_ULAW_CLIP = 8159
_ULAW_SEGMENT_ENDS = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])
_ALAW_SEGMENT_ENDS = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])
_ALL_INT16 = np.arange(-32768, 32768, dtype=np.int32)
_ALL_CODES = np.arange(256, dtype=np.int32)


def _read_only(table: np.ndarray) -> np.ndarray:
    table.flags.writeable = False
    return table


def _ulaw_encode_int32(pcm: np.ndarray) -> np.ndarray:
    """Mu-law codes of 16-bit samples, computed once to fill the table."""
    value_14bit = pcm >> 2
    mask = np.where(value_14bit < 0, 0x7F, 0xFF)
    magnitude = np.minimum(np.abs(value_14bit), _ULAW_CLIP) + (_ULAW_BIAS >> 2)
    segment = np.searchsorted(_ULAW_SEGMENT_ENDS, magnitude)
    mantissa = (magnitude >> (segment + 1)) & 0xF
    # Past the last segment the sample takes the largest code, as in the reference coder.
    codes = np.where(segment >= 8, 0x7F, (segment << 4) | mantissa)
    return codes ^ mask


def _ulaw_decode_int32(codes: np.ndarray) -> np.ndarray:
    inverted = ~codes & 0xFF
    magnitude = (((inverted & 0x0F) << 3) + _ULAW_BIAS) << ((inverted & 0x70) >> 4)
    return np.where(inverted & 0x80, _ULAW_BIAS - magnitude, magnitude - _ULAW_BIAS)


def _alaw_encode_int32(pcm: np.ndarray) -> np.ndarray:
    value_13bit = pcm >> 3
    negative = value_13bit < 0
    mask = np.where(negative, 0x55, 0xD5)
    magnitude = np.where(negative, -value_13bit - 1, value_13bit)
    segment = np.searchsorted(_ALAW_SEGMENT_ENDS, magnitude)
    # Segments 0 and 1 share one step size.
    mantissa = (magnitude >> np.maximum(segment, 1)) & 0xF
    return ((segment << 4) | mantissa) ^ mask


def _alaw_decode_int32(codes: np.ndarray) -> np.ndarray:
    toggled = codes ^ 0x55
    segment = (toggled & 0x70) >> 4
    step = ((toggled & 0x0F) << 4) + np.where(segment == 0, 8, 0x108)
    magnitude = step << np.maximum(segment - 1, 0)
    return np.where(toggled & 0x80, magnitude, -magnitude)


_ULAW_ENCODE_TABLE = _read_only(_ulaw_encode_int32(_ALL_INT16).astype(np.uint8))
_ULAW_DECODE_TABLE = _read_only(_ulaw_decode_int32(_ALL_CODES).astype(np.int16))
_ALAW_ENCODE_TABLE = _read_only(_alaw_encode_int32(_ALL_INT16).astype(np.uint8))
_ALAW_DECODE_TABLE = _read_only(_alaw_decode_int32(_ALL_CODES).astype(np.int16))


def _table_index(pcm: np.ndarray) -> np.ndarray:
    """Offset int16 samples into 0..65535 so they index a 65536-entry encode table."""
    return np.asarray(pcm, dtype=np.int16).view(np.uint16) ^ 0x8000


def ulaw_encode(pcm: np.ndarray) -> np.ndarray:
    """Encode int16 samples to mu-law codes (uint8)."""
    return _ULAW_ENCODE_TABLE[_table_index(pcm)]


def ulaw_decode(codes: np.ndarray) -> np.ndarray:
    """Decode mu-law codes (uint8) to int16 samples."""
    return _ULAW_DECODE_TABLE[np.asarray(codes, dtype=np.uint8)]


def alaw_encode(pcm: np.ndarray) -> np.ndarray:
    """Encode int16 samples to A-law codes (uint8)."""
    return _ALAW_ENCODE_TABLE[_table_index(pcm)]


def alaw_decode(codes: np.ndarray) -> np.ndarray:
    """Decode A-law codes (uint8) to int16 samples."""
    return _ALAW_DECODE_TABLE[np.asarray(codes, dtype=np.uint8)]
