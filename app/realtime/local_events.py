"""Ids and server event envelopes of the local model, shaped like OpenAI's."""

from __future__ import annotations

import secrets
import string

_ID_ALPHABET = string.ascii_letters + string.digits
_ID_SUFFIX_LENGTH = 21


def new_id(prefix: str) -> str:
    """An id like OpenAI's: `event_`, `resp_`, `item_`, `sess_` or `conv_` and 21 random letters and digits."""
    return f"{prefix}_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(_ID_SUFFIX_LENGTH))


class Refusal(Exception):
    """A client event the session refuses; it becomes one `error` event and the session carries on."""

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.code, self.param = message, code, param


def server_event(event_type: str, **fields: object) -> dict:
    return {"type": event_type, "event_id": new_id("event"), **fields}


def error_event(
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    client_event_id: str | None = None,
    error_type: str = "invalid_request_error",
) -> dict:
    """An `error` event; `client_event_id` names the client event that caused it, when it had one."""
    return server_event(
        "error",
        error={"type": error_type, "code": code, "message": message, "param": param, "event_id": client_event_id},
    )
