"""The delivery webhook on `callgate serve`: verification, signatures, and callbacks in any order, through the writer."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from datetime import datetime

import httpx
import pytest
import trio

from app.server import serve
from app.settings import Settings
from storage.models import (
    Business, WhatsappBroadcast, WhatsappBroadcastRecipient, counters_from_rows, move_recipients, utc_now,
)

APP_SECRET = "app-secret"
VERIFY_TOKEN = "verify-me"
WAIT_LIMIT_S = 20  # a bound on hangs, not a timing assertion


def callback(*statuses: tuple[str, str], inbound_messages: int = 0) -> bytes:
    value = {"messaging_product": "whatsapp", "statuses": [
        {"id": message_id, "status": status, "timestamp": "1750857384", "recipient_id": "972502345610"}
        for message_id, status in statuses]}
    if inbound_messages:
        value["messages"] = [{"from": "972502345699", "id": f"wamid.IN{n}", "type": "text"}
                             for n in range(inbound_messages)]
    return json.dumps({"object": "whatsapp_business_account",
                       "entry": [{"id": "1", "changes": [{"field": "messages", "value": value}]}]}).encode()


def signed(body: bytes) -> dict[str, str]:
    return {"X-Hub-Signature-256": "sha256=" + hmac.new(APP_SECRET.encode(), body, hashlib.sha256).hexdigest(),
            "Content-Type": "application/json"}


def sent_broadcast(message_ids: list[str]) -> int:
    business = Business.create(name="Acme", created_at=utc_now())
    broadcast = WhatsappBroadcast.create(business=business, name="b", template_name="t", template_language="he",
                                         status="running", total_recipients=len(message_ids))
    for number, message_id in enumerate(message_ids):
        row = WhatsappBroadcastRecipient.create(broadcast=broadcast, business=business, phone=f"+9725023456{number:02d}")
        move_recipients(broadcast.id, "queued", "sent", WhatsappBroadcastRecipient.id == row.id, message_id=message_id)
    return broadcast.id


async def until(condition) -> None:
    with trio.fail_after(WAIT_LIMIT_S):
        while not await trio.to_thread.run_sync(condition):
            await trio.sleep(0.05)


@pytest.fixture
async def webhook_client(tmp_path):
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'w.db'}", spill_dir=str(tmp_path / "spill"), port=0, whatsapp_app_secret=APP_SECRET,
                        whatsapp_verify_token=VERIFY_TOKEN)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve, settings)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            yield client
        nursery.cancel_scope.cancel()


async def test_the_verification_challenge(webhook_client):
    query = {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "1158201444"}
    answer = await webhook_client.get("/whatsapp/webhook", params=query)
    assert (answer.status_code, answer.text) == (200, "1158201444")
    refused = await webhook_client.get("/whatsapp/webhook", params={**query, "hub.verify_token": "guess"})
    assert refused.status_code == 403


async def test_a_bad_or_missing_signature_gives_403_and_changes_nothing(webhook_client):
    broadcast_id = sent_broadcast(["wamid.A", "wamid.B"])
    body = callback(("wamid.A", "delivered"))
    assert (await webhook_client.post("/whatsapp/webhook", content=body)).status_code == 403
    forged = {"X-Hub-Signature-256": "sha256=" + "0" * 64}
    assert (await webhook_client.post("/whatsapp/webhook", content=body, headers=forged)).status_code == 403
    assert (await webhook_client.post("/whatsapp/webhook", content=body + b" ", headers=signed(body))).status_code == 403
    # Statuses are written in the order they came: once a later, signed one is in, a refused one would be too.
    barrier = callback(("wamid.B", "delivered"))
    assert (await webhook_client.post("/whatsapp/webhook", content=barrier, headers=signed(barrier))).status_code == 200
    recipient = WhatsappBroadcastRecipient
    await until(lambda: recipient.get(recipient.message_id == "wamid.B").status == "delivered")
    assert recipient.get(recipient.message_id == "wamid.A").status == "sent"
    assert WhatsappBroadcast.get_by_id(broadcast_id).delivered_count == 1


async def test_reordered_and_repeated_callbacks_end_in_the_right_state(webhook_client):
    broadcast_id = sent_broadcast(["wamid.A", "wamid.B", "wamid.C"])
    bodies = [callback(("wamid.A", "read")), callback(("wamid.A", "delivered")),
              callback(("wamid.B", "delivered")), callback(("wamid.B", "delivered")),
              callback(("wamid.C", "failed"), ("wamid.C", "delivered"))]
    for body in bodies:
        assert (await webhook_client.post("/whatsapp/webhook", content=body, headers=signed(body))).status_code == 200
    recipient = WhatsappBroadcastRecipient
    await until(lambda: recipient.select().where(recipient.status == "sent").count() == 0)
    statuses = {row.message_id: row.status for row in recipient.select()}
    assert statuses == {"wamid.A": "read", "wamid.B": "delivered", "wamid.C": "failed"}
    read_row = recipient.get(recipient.message_id == "wamid.A")
    assert read_row.read_at is not None and read_row.delivered_at is not None
    assert recipient.get(recipient.message_id == "wamid.C").error_at == datetime(2025, 6, 25, 13, 16, 24)
    broadcast = WhatsappBroadcast.get_by_id(broadcast_id)
    assert {name: getattr(broadcast, name) for name in counters_from_rows(broadcast_id)} == counters_from_rows(
        broadcast_id)
    assert (broadcast.delivered_count, broadcast.read_count) == (2, 1)


async def test_unknown_ids_and_inbound_messages_are_acknowledged_and_logged(webhook_client, caplog):
    caplog.set_level(logging.INFO)
    body = callback(("wamid.NOBODY", "delivered"), inbound_messages=2)
    assert (await webhook_client.post("/whatsapp/webhook", content=body, headers=signed(body))).status_code == 200
    with trio.fail_after(WAIT_LIMIT_S):
        while "status for an unknown message id acknowledged" not in caplog.text:
            await trio.sleep(0.05)
    assert "callback queued statuses=1 other_entries=2" in caplog.text


async def test_a_burst_of_callbacks_is_never_lost(webhook_client):
    message_ids = [f"wamid.{n}" for n in range(60)]
    broadcast_id = sent_broadcast(message_ids)
    answers = []

    async def post(body: bytes) -> None:
        answers.append((await webhook_client.post("/whatsapp/webhook", content=body, headers=signed(body))).status_code)

    async with trio.open_nursery() as nursery:
        for message_id in message_ids:
            for status in ("delivered", "read"):
                nursery.start_soon(post, callback((message_id, status)))
    assert answers == [200] * 120
    await until(lambda: WhatsappBroadcast.get_by_id(broadcast_id).read_count == 60)
    assert counters_from_rows(broadcast_id)["delivered_count"] == 60
