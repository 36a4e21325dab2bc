"""The WhatsApp delivery webhook, sans-io: verification, signatures, and forward-only statuses."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Mapping

class WebhookPayloadError(ValueError):
    """The body is not a WhatsApp Business Account notification."""


@dataclass(frozen=True, slots=True)
class StatusUpdate:
    message_id: str
    status: str
    at: datetime
    error_code: int | None = None
    error_title: str = ""


def verification_answer(query: Mapping[str, str], verify_token: str) -> tuple[int, str]:
    """Meta's subscription check: echo the challenge only for our own verify token."""
    token_matches = bool(verify_token) and hmac.compare_digest(query.get("hub.verify_token", ""), verify_token)
    if query.get("hub.mode") == "subscribe" and token_matches:
        return 200, query.get("hub.challenge", "")
    return 403, "verification failed"


def signature_is_valid(app_secret: str, raw_body: bytes, header: str) -> bool:
    """X-Hub-Signature-256 is HMAC-SHA256 of the raw bytes, compared in constant time."""
    if not app_secret or not header.startswith("sha256="):
        return False
    expected = hmac.new(app_secret.encode(), raw_body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, header.removeprefix("sha256="))


def status_updates(payload: object) -> tuple[list[StatusUpdate], int]:
    """The delivery statuses in a notification, and how many other entries (inbound messages, errors) it had."""
    if not isinstance(payload, dict) or payload.get("object") != "whatsapp_business_account":
        raise WebhookPayloadError("not a whatsapp_business_account notification")
    updates: list[StatusUpdate] = []
    others = 0
    for entry in payload.get("entry") or []:
        for change in entry.get("changes") or []:
            value = change.get("value") or {}
            others += len(value.get("messages") or []) + len(value.get("errors") or [])
            updates.extend(_status_update(status) for status in value.get("statuses") or [])
    return updates, others


def _status_update(status: dict) -> StatusUpdate:
    try:
        at = datetime.fromtimestamp(int(status["timestamp"]), tz=timezone.utc)
        errors = status.get("errors") or [{}]
        return StatusUpdate(str(status["id"]), str(status["status"]), at, errors[0].get("code"),
                            str(errors[0].get("title", "")))
    except (KeyError, TypeError, ValueError) as error:
        raise WebhookPayloadError(f"bad status entry: {type(error).__name__} {error}") from None
