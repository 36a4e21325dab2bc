"""Reading fields of parsed JSON where the protocol says text: a peer can send anything there."""

from __future__ import annotations

from typing import Any


def text(value: Any) -> str:
    """`value` itself when it is text; TypeError, which the protocol parsers report as theirs, when it is not."""
    if not isinstance(value, str):
        raise TypeError(f"expected text, got {type(value).__name__}")
    return value
