"""The Cloud API sandbox: Meta's answers and validation without sockets, then the real server over
loopback with httpx (keep-alive, held requests, injected failure rates, the record file)."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from contextlib import asynccontextmanager
from functools import partial

import httpx
import pytest
import trio

from app.http import HttpRequest
from app.whatsapp.cloud_api import template_message, text_message
from app.whatsapp.sandbox import Answer, CloudApiSandbox, Hold, parse_fail_spec
from app.whatsapp.sandbox_server import SandboxService, add_sandbox_arguments, serve_sandbox

MESSAGES_PATH = "/v21.0/1065/messages"
AUTHORIZED = {"authorization": "Bearer sandbox-token", "content-type": "application/json"}
SPEC_WITHOUT_TIMEOUTS = "429:0.1,500:0.05,131026:0.05"
ERROR_KEYS = {"message", "type", "code", "error_subcode", "error_data", "fbtrace_id"}


def send_request(message: object, headers: dict[str, str] = AUTHORIZED) -> HttpRequest:
    body = message if isinstance(message, bytes) else json.dumps(message).encode()
    return HttpRequest("POST", MESSAGES_PATH, headers, body)


def sandbox_with(spec: str = "", seed: int = 0, access_token: str | None = None) -> CloudApiSandbox:
    return CloudApiSandbox(parse_fail_spec(spec), seed=seed, access_token=access_token)


def assert_meta_error(reply: object, status: int, code: int) -> dict:
    assert isinstance(reply, Answer) and reply.record is None
    assert (reply.status, set(reply.body), set(reply.body["error"])) == (status, {"error"}, ERROR_KEYS)
    error = reply.body["error"]
    assert (error["code"], error["type"]) == (code, "OAuthException")
    assert error["error_data"]["details"] and len(error["fbtrace_id"]) == 23
    return error


def test_a_valid_text_message_is_accepted_like_meta_and_recorded_as_received():
    message = text_message("+972501234567", "שלום דנה")
    reply = sandbox_with().handle(send_request(message), received_at_s=1750000000.25)
    assert isinstance(reply, Answer) and reply.status == 200
    message_id = reply.body["messages"][0]["id"]
    assert reply.body == {"messaging_product": "whatsapp",
                          "contacts": [{"input": "972501234567", "wa_id": "972501234567"}],
                          "messages": [{"id": message_id}]}
    assert message_id.startswith("wamid.") and len(message_id) > 30
    assert reply.record == {**message, "received_at": 1750000000.25, "message_id": message_id}


def test_a_valid_template_message_is_accepted_and_message_ids_are_unique():
    sandbox = sandbox_with()
    replies = [sandbox.handle(send_request(template_message("+972501234567", "spring_sale", "he")), 0.0)
               for _ in range(50)]
    assert {reply.status for reply in replies} == {200}
    assert len({reply.body["messages"][0]["id"] for reply in replies}) == 50
    assert replies[0].record["template"] == {"name": "spring_sale", "language": {"code": "he"}}


@pytest.mark.parametrize("headers", [{}, {"authorization": "Basic abc"}, {"authorization": "Bearer "}])
def test_a_send_without_a_bearer_token_is_refused_with_190(headers):
    reply = sandbox_with().handle(send_request(text_message("+97250", "hi"), headers), 0.0)
    assert "Cannot parse access token" in assert_meta_error(reply, 401, 190)["message"]


def test_a_configured_access_token_must_match():
    sandbox = sandbox_with(access_token="right")
    wrong = sandbox.handle(send_request(text_message("+97250", "hi"), {"authorization": "Bearer wrong"}), 0.0)
    assert assert_meta_error(wrong, 401, 190)["error_subcode"] == 463
    right = sandbox.handle(send_request(text_message("+97250", "hi"), {"authorization": "Bearer right"}), 0.0)
    assert right.status == 200


@pytest.mark.parametrize("message, details_word", [
    (b"{not json", "JSON"),
    (b"\xff\xfe", "JSON"),
    (["a list"], "object"),
    ({"to": "97250", "type": "text", "text": {"body": "hi"}}, "messaging_product"),
    ({"messaging_product": "sms", "to": "97250", "text": {"body": "hi"}}, "messaging_product"),
    ({"messaging_product": "whatsapp", "type": "text", "text": {"body": "hi"}}, "to"),
    ({"messaging_product": "whatsapp", "to": "+97250", "text": {"body": "hi"}}, "to"),
    ({"messaging_product": "whatsapp", "to": "٩٧٢٥٠", "text": {"body": "hi"}}, "to"),
    ({"messaging_product": "whatsapp", "to": "97250", "type": "text"}, "text['body']"),
    ({"messaging_product": "whatsapp", "to": "97250", "type": "text", "text": {"body": ""}}, "text['body']"),
    ({"messaging_product": "whatsapp", "to": "97250", "type": "template",
      "template": {"language": {"code": "he"}}}, "template['name']"),
    ({"messaging_product": "whatsapp", "to": "97250", "type": "template",
      "template": {"name": "sale", "language": {}}}, "template['language']['code']"),
    ({"messaging_product": "whatsapp", "to": "97250", "type": "image", "image": {"id": "1"}}, "image"),
])
def test_an_invalid_send_is_refused_with_100_and_not_recorded(message, details_word):
    error = assert_meta_error(sandbox_with().handle(send_request(message), 0.0), 400, 100)
    assert details_word in error["error_data"]["details"]


@pytest.mark.parametrize("key, status, code", [
    ("429", 429, 130429), ("500", 500, 131000), ("503", 503, 131016), ("502", 502, 2),
    ("130429", 400, 130429), ("131056", 400, 131056), ("80007", 400, 80007), ("4", 400, 4), ("613", 400, 613),
    ("131026", 400, 131026), ("131047", 400, 131047), ("131049", 400, 131049), ("132000", 400, 132000),
    ("132001", 404, 132001), ("100", 400, 100), ("190", 401, 190), ("131000", 500, 131000),
])
def test_each_injected_failure_answers_metas_status_and_error_body(key, status, code):
    reply = sandbox_with(f"{key}:1").handle(send_request(text_message("+97250", "hi")), 0.0)
    error = assert_meta_error(reply, status, code)
    assert error["message"].startswith(f"(#{code})") or code == 190


def test_an_injected_timeout_accepts_and_records_but_holds_the_answer():
    message = text_message("+97250", "hi")
    reply = sandbox_with("timeout:1").handle(send_request(message), 12.5)
    assert isinstance(reply, Hold)
    assert reply.record["message_id"].startswith("wamid.")
    assert {key: reply.record[key] for key in message} == message and reply.record["received_at"] == 12.5


def test_invalid_requests_are_refused_before_any_failure_is_drawn():
    reply = sandbox_with("timeout:1").handle(send_request({"messaging_product": "whatsapp"}), 0.0)
    assert_meta_error(reply, 400, 100)


@pytest.mark.parametrize("spec, complaint", [
    ("bogus:0.1", "unknown failure 'bogus'"),
    ("404:0.1", "unknown failure '404'"),
    ("429", "KEY:RATE"),
    ("429:lots", "KEY:RATE"),
    ("429:1.5", "between 0 and 1"),
    ("429:0.6,500:0.6", "at most 1"),
    ("429:0.1,429:0.2", "twice"),
])
def test_a_bad_fail_spec_says_what_is_wrong(spec, complaint):
    with pytest.raises(ValueError, match=complaint.replace("(", r"\(")):
        parse_fail_spec(spec)


def test_a_bad_fail_spec_is_a_cli_usage_error(capsys):
    parser = argparse.ArgumentParser(prog="callgate whatsapp-sandbox")
    add_sandbox_arguments(parser)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--fail", "429:0.1,teapot:0.2"])
    assert exit_info.value.code == 2 and "unknown failure 'teapot'" in capsys.readouterr().err
    args = parser.parse_args(["--fail", "429:0.1,timeout:0.02", "--port", "0", "--record", "r.jsonl"])
    assert ((args.fail, args.port, args.record, args.seed, args.access_token)
            == ("429:0.1,timeout:0.02", 0, "r.jsonl", 0, None))


def statuses_for(spec: str, seed: int, count: int) -> list[object]:
    """What the sandbox answers `count` identical valid sends, "held" for an injected timeout."""
    sandbox = sandbox_with(spec, seed=seed)
    return [getattr(sandbox.handle(send_request(text_message("+97250", "hi")), 0.0), "status", "held")
            for _ in range(count)]


def test_the_same_seed_gives_the_same_answers_and_the_rates_hold():
    spec = "429:0.1,500:0.05,timeout:0.02,131026:0.05"
    first = statuses_for(spec, seed=11, count=2000)
    assert first == statuses_for(spec, seed=11, count=2000) and first != statuses_for(spec, seed=12, count=2000)
    counts = Counter(first)
    for status, rate in ((429, 0.1), (500, 0.05), ("held", 0.02), (400, 0.05), (200, 0.78)):
        assert abs(counts[status] - rate * 2000) < max(20, rate * 2000 * 0.25), (status, counts)


# Over real sockets, with httpx under trio.


@asynccontextmanager
async def running_sandbox(record_path, spec: str = "", seed: int = 0):
    with open(record_path, "a", encoding="utf-8") as record_file:
        service = SandboxService(sandbox_with(spec, seed), record_file)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(service.serve, "127.0.0.1", 0)
            yield service, f"http://127.0.0.1:{port}{MESSAGES_PATH}"
            nursery.cancel_scope.cancel()


def recorded(record_path) -> list[dict]:
    return [json.loads(line) for line in record_path.read_text(encoding="utf-8").splitlines()]


async def test_one_client_sends_many_messages_over_one_kept_alive_connection(tmp_path):
    record_path = tmp_path / "sent.jsonl"
    async with running_sandbox(record_path) as (service, url):
        async with httpx.AsyncClient(headers=AUTHORIZED) as client:
            message_ids = []
            for index in range(5):
                response = await client.post(url, json=template_message(f"+97250000000{index}", "sale", "he"))
                assert response.status_code == 200
                message_ids.append(response.json()["messages"][0]["id"])
            # Read while the server still runs: each line is flushed as the message is accepted.
            lines = recorded(record_path)
        assert service.connections_opened == 1
    assert [line["message_id"] for line in lines] == message_ids
    assert lines[4]["to"] == "972500000004" and isinstance(lines[4]["received_at"], float)
    assert set(lines[0]) == {"messaging_product", "to", "type", "template", "received_at", "message_id"}


async def test_only_the_send_endpoint_is_served(tmp_path):
    async with running_sandbox(tmp_path / "sent.jsonl") as (_, url):
        async with httpx.AsyncClient(headers=AUTHORIZED) as client:
            assert (await client.get(url)).status_code == 405
            assert (await client.post(url.replace("/messages", "/media"), json={})).status_code == 404
            assert (await client.post(url.replace("/1065/", "/1065/x/"), json={})).status_code == 404
            refused = await client.post(url, content=b"not json")
            assert (refused.status_code, refused.json()["error"]["code"]) == (400, 100)


def seed_holding_only_the_first_of(send_count: int, spec: str) -> int:
    return next(seed for seed in range(1000)
                if statuses_for(spec, seed, send_count) == ["held"] + [200] * (send_count - 1))


async def test_a_timed_out_send_is_recorded_but_unanswered_while_other_sends_proceed(tmp_path, autojump_clock):
    spec = "timeout:0.5"
    record_path = tmp_path / "sent.jsonl"
    held_outcomes = []
    async with running_sandbox(record_path, spec, seed_holding_only_the_first_of(5, spec)) as (service, url):
        async with httpx.AsyncClient(headers=AUTHORIZED, timeout=60) as client:

            async def send_the_held_message():
                with pytest.raises(httpx.ReadTimeout):
                    await client.post(url, json=text_message("+972500000000", "held"))
                held_outcomes.append("client gave up")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_the_held_message)
                while not record_path.read_text():
                    await trio.sleep(0.001)
                for index in range(1, 5):
                    response = await client.post(url, json=text_message(f"+97250000000{index}", "later"))
                    assert response.status_code == 200
                assert (held_outcomes, service.requests_on_hold) == ([], 1)
            assert held_outcomes == ["client gave up"]
        with trio.fail_after(1):  # the client hung up, so the server stops holding
            while service.requests_on_hold:
                await trio.sleep(0.01)
    lines = recorded(record_path)
    assert [line["text"]["body"] for line in lines] == ["held", "later", "later", "later", "later"]
    assert len({line["message_id"] for line in lines}) == 5


async def test_injected_failure_rates_hold_over_a_few_hundred_sends(tmp_path):
    record_path = tmp_path / "sent.jsonl"
    statuses = []
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_sandbox, "127.0.0.1", 0, record_path=record_path,
                                           fail_spec=SPEC_WITHOUT_TIMEOUTS, seed=3))
        async with httpx.AsyncClient(headers=AUTHORIZED) as client:
            for _ in range(400):
                response = await client.post(f"http://127.0.0.1:{port}{MESSAGES_PATH}",
                                             json=text_message("+97250", "hi"))
                statuses.append(response.status_code)
        nursery.cancel_scope.cancel()
    assert statuses == statuses_for(SPEC_WITHOUT_TIMEOUTS, seed=3, count=400)
    counts = Counter(statuses)
    for status, rate in ((429, 0.1), (500, 0.05), (400, 0.05), (200, 0.8)):
        assert abs(counts[status] - rate * 400) < max(12, rate * 400 * 0.3), (status, counts)
    assert len(recorded(record_path)) == counts[200]
