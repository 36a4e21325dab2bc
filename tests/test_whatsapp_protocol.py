"""The Cloud API's send answers and the delivery webhook, without sockets."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import datetime, timezone

import pytest

from app.whatsapp.cloud_api import (
    Rejected, RetryLater, Sent, TokenRejected, classify_response, messages_url, template_message, text_message,
)
from app.whatsapp.webhook import (
    StatusUpdate, WebhookPayloadError, signature_is_valid, status_updates, verification_answer,
)
from storage.delivery import moves_forward


def meta_error(code: int, message: str = "boom") -> bytes:
    return json.dumps({"error": {"message": message, "type": "OAuthException", "code": code,
                                 "error_subcode": 2494010, "fbtrace_id": "Ax1"}}).encode()


def test_request_bodies_are_metas():
    assert messages_url("https://graph.facebook.com/", "v21.0", "1065") == \
        "https://graph.facebook.com/v21.0/1065/messages"
    assert text_message("+972501234567", "שלום") == {
        "messaging_product": "whatsapp", "recipient_type": "individual", "to": "972501234567",
        "type": "text", "text": {"body": "שלום"}}
    assert template_message("+972501234567", "spring_sale", "he")["template"] == {
        "name": "spring_sale", "language": {"code": "he"}}


@pytest.mark.parametrize("status, body, expected", [
    (200, b'{"messaging_product":"whatsapp","messages":[{"id":"wamid.X1"}]}', Sent("wamid.X1")),
    (429, meta_error(130429, "rate"), RetryLater(130429, "rate")),
    (400, meta_error(80007, "account rate"), RetryLater(80007, "account rate")),
    (503, b"<html>down</html>", RetryLater(None, "HTTP 503")),
    (400, meta_error(131026, "no whatsapp"), Rejected(131026, "no whatsapp")),
    (400, meta_error(132001, "no template"), Rejected(132001, "no template")),
    (401, meta_error(190, "expired"), TokenRejected(190, "expired")),
])
def test_each_answer_maps_to_what_the_sender_must_do(status, body, expected):
    assert classify_response(status, body) == expected


def test_an_accepted_answer_without_an_id_is_never_sent_again():
    assert isinstance(classify_response(200, b"{}"), Rejected)


def test_verification_echoes_the_challenge_only_for_our_token():
    query = {"hub.mode": "subscribe", "hub.verify_token": "tok", "hub.challenge": "1158201444"}
    assert verification_answer(query, "tok") == (200, "1158201444")
    assert verification_answer(query, "other")[0] == 403
    assert verification_answer(query, "")[0] == 403
    assert verification_answer({**query, "hub.mode": "unsubscribe"}, "tok")[0] == 403


def test_signatures_are_checked_over_the_raw_bytes():
    body = b'{"object":"whatsapp_business_account"}'
    good = "sha256=" + hmac.new(b"secret", body, hashlib.sha256).hexdigest()
    assert signature_is_valid("secret", body, good)
    assert not signature_is_valid("secret", body + b" ", good)
    assert not signature_is_valid("secret", body, good.replace("sha256=", "sha1="))
    assert not signature_is_valid("", body, good)


def test_status_callbacks_are_read_and_other_entries_counted():
    payload = {"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [{"field": "messages", "value": {
        "messaging_product": "whatsapp",
        "statuses": [
            {"id": "wamid.A", "status": "delivered", "timestamp": "1750857384", "recipient_id": "972501234567"},
            {"id": "wamid.B", "status": "failed", "timestamp": "1750857385", "recipient_id": "972501234568",
             "errors": [{"code": 131026, "title": "Receiver incapable"}]}],
        "messages": [{"from": "972501234569", "id": "wamid.IN", "type": "text"}]}}]}]}
    updates, others = status_updates(payload)
    assert updates == [
        StatusUpdate("wamid.A", "delivered", datetime(2025, 6, 25, 13, 16, 24, tzinfo=timezone.utc)),
        StatusUpdate("wamid.B", "failed", datetime(2025, 6, 25, 13, 16, 25, tzinfo=timezone.utc), 131026,
                     "Receiver incapable")]
    assert others == 1
    with pytest.raises(WebhookPayloadError):
        status_updates({"object": "page"})


@pytest.mark.parametrize("current, incoming, forward", [
    ("sent", "delivered", True), ("delivered", "read", True), ("sent", "read", True),
    ("read", "delivered", False), ("delivered", "delivered", False), ("sending", "sent", True),
    ("sent", "failed", True), ("delivered", "failed", False), ("unknown", "delivered", True),
])
def test_statuses_only_move_forward(current, incoming, forward):
    assert moves_forward(current, incoming) is forward
