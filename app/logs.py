"""One structured log line per event: `call=<id> [TAG] message key=value ...`."""

from __future__ import annotations

import logging


def format_event(call_id: str, tag: str, message: str, **fields: object) -> str:
    """Render one event line; values with spaces are quoted so the line stays parseable."""
    parts = [f"call={call_id}", f"[{tag}]"]
    if message:
        parts.append(message)
    for key, value in fields.items():
        text = str(value)
        parts.append(f"{key}={text!r}" if (" " in text or not text) else f"{key}={text}")
    return " ".join(parts)


def log_event(
    logger: logging.Logger, call_id: str, tag: str, message: str = "", *, level: int = logging.INFO, **fields: object
) -> None:
    logger.log(level, format_event(call_id, tag, message, **fields))


def configure_logging(level: str) -> None:
    """Log to stderr at `level`; the handler filters too, so a logger raised to INFO elsewhere stays quiet here."""
    handler = logging.StreamHandler()
    handler.setLevel(level.upper())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])
