"""The WhatsApp Cloud API send endpoint, sans-io: request bodies out, typed outcomes in."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Union

# Meta's throughput and call-rate limits: back off and send again.
RETRYABLE_CODES = frozenset({130429, 131056, 80007, 4, 613})
# An expired or revoked token fails every recipient alike: the whole broadcast must stop.
TOKEN_CODES = frozenset({190})


@dataclass(frozen=True, slots=True)
class Sent:
    message_id: str


@dataclass(frozen=True, slots=True)
class RetryLater:
    """Throttled or a server fault: the message was not accepted and may be sent again."""

    code: int | None
    message: str


@dataclass(frozen=True, slots=True)
class Rejected:
    """Permanent for this recipient (no WhatsApp, outside the window, bad template...)."""

    code: int | None
    message: str


@dataclass(frozen=True, slots=True)
class TokenRejected:
    code: int
    message: str


SendOutcome = Union[Sent, RetryLater, Rejected, TokenRejected]


def messages_url(api_base: str, api_version: str, phone_number_id: str) -> str:
    return f"{api_base.rstrip('/')}/{api_version}/{phone_number_id}/messages"


def text_message(to_e164: str, body: str) -> dict:
    """Free text: Meta delivers it only inside the recipient's 24-hour window."""
    return {"messaging_product": "whatsapp", "recipient_type": "individual", "to": to_e164.lstrip("+"),
            "type": "text", "text": {"body": body}}


def template_message(to_e164: str, template_name: str, language_code: str) -> dict:
    """An approved template: the only message that may open a conversation."""
    return {"messaging_product": "whatsapp", "to": to_e164.lstrip("+"), "type": "template",
            "template": {"name": template_name, "language": {"code": language_code}}}


def classify_response(http_status: int, body: bytes) -> SendOutcome:
    """What one answer of the send endpoint means for the recipient and the broadcast."""
    try:
        payload = json.loads(body) if body else {}
    except json.JSONDecodeError:
        payload = {}
    if http_status == 200:
        messages = payload.get("messages") if isinstance(payload, dict) else None
        if messages and isinstance(messages[0], dict) and messages[0].get("id"):
            return Sent(str(messages[0]["id"]))
        # Accepted but unreadable: it may have gone out, so it must never be sent again.
        return Rejected(None, f"HTTP 200 without a message id: {body[:200]!r}")
    error = payload.get("error") if isinstance(payload, dict) else None
    error = error if isinstance(error, dict) else {}
    code = error.get("code") if isinstance(error.get("code"), int) else None
    message = str(error.get("message") or f"HTTP {http_status}")
    if code in TOKEN_CODES:
        return TokenRejected(code, message)
    if code in RETRYABLE_CODES or http_status == 429 or http_status >= 500:
        return RetryLater(code, message)
    return Rejected(code, message)
