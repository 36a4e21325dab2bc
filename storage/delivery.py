"""Delivery callbacks applied to broadcast recipients: forward only, counted, whatever order they come in."""

from __future__ import annotations

import logging

from app.logs import log_event
from storage.models import WhatsappBroadcastRecipient, as_utc, move_recipients
from storage.records import WhatsappStatusRecord

logger = logging.getLogger(__name__)

STATUS_ORDER = {"queued": 0, "claimed": 0, "sending": 1, "unknown": 1, "sent": 2, "delivered": 3, "read": 4}
RACE_RETRIES = 3


def moves_forward(current: str, incoming: str) -> bool:
    """sent < delivered < read; failed may follow a send but never undo a delivery."""
    if incoming == "failed":
        return STATUS_ORDER.get(current, 0) <= STATUS_ORDER["sent"]
    return incoming in STATUS_ORDER and STATUS_ORDER[incoming] > STATUS_ORDER.get(current, len(STATUS_ORDER))


def apply_delivery_status(record: WhatsappStatusRecord) -> None:
    """Move the recipient with this message id forward; a repeat or a late, older status changes nothing."""
    recipient = WhatsappBroadcastRecipient
    for _ in range(RACE_RETRIES):
        row = recipient.get_or_none(recipient.message_id == record.message_id)
        if row is None:
            log_event(logger, "-", "WA_WEBHOOK", "status for an unknown message id acknowledged",
                      message_id=record.message_id, status=record.status)
            return
        if not moves_forward(row.status, record.status):
            return
        if move_recipients(row.broadcast_id, row.status, record.status, recipient.id == row.id,
                           **_fields_for(record, row)):
            return
    log_event(logger, "-", "WA_WEBHOOK", "status kept losing races; left as it was", level=logging.WARNING,
              message_id=record.message_id, status=record.status)


def _fields_for(record: WhatsappStatusRecord, row: WhatsappBroadcastRecipient) -> dict:
    at = as_utc(record.at)
    if record.status == "failed":
        return {"error_code": record.error_code, "error_message": record.error_title or "failed after sending",
                "error_at": at}
    # A read implies a delivery, even when the delivered callback comes later or never.
    fields = {"delivered_at": row.delivered_at or at}
    if record.status == "read":
        fields["read_at"] = at
    return fields
