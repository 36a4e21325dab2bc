"""The one port: health, Twilio's voice webhook with its signature, WebSocket upgrades, unknown paths,
kept-alive connections."""

from __future__ import annotations

import gc
import json
import logging
import os
import socket
import time
from functools import partial

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionRejected, HandshakeError, open_websocket_url

from app.carriers import twilio
from app.carriers.simulated_twilio import stream_from_twiml
from app.http import (
    CLOSE_TIMEOUT_S, KEEP_ALIVE_IDLE_S, MAX_BODY_BYTES, REQUEST_TIMEOUT_S, ConnectionLimits, HttpRequest, HttpResponse, Router,
)
from app.call import ModelEndpoint
from app.server import MEDIA_PATH, START_TIMEOUT_S, CallgateServer, serve
from app.settings import Settings
from storage.db import open_database, run_outside_transaction
from storage.records import WhatsappStatusRecord
from storage.writer import StorageWriter, StorageWriters
from tests.storage_fixtures import postgres_database_url  # noqa: F401 (fixture)

AUTH_TOKEN = "12345"
PUBLIC_HOST = "calls.example.com"


async def http_head_and_body(port: int, request: bytes) -> tuple[bytes, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        response = b""
        while chunk := await stream.receive_some(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    return head, body


async def http(port: int, request: bytes) -> tuple[int, bytes]:
    head, body = await http_head_and_body(port, request)
    return int(head.split(b" ")[1]), body


def post(path: str, body: str, signature: str | None = None) -> bytes:
    signature_header = f"X-Twilio-Signature: {signature}\r\n" if signature is not None else ""
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {len(body)}\r\n{signature_header}\r\n{body}").encode()


async def with_server(tmp_path, test, **overrides):
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'h.db'}", spill_dir=str(tmp_path / "spill"), port=0, public_host=PUBLIC_HOST, **overrides)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve, settings)
        await test(port)
        nursery.cancel_scope.cancel()


async def test_health_and_unknown_routes(tmp_path, autojump_clock):
    async def check(port):
        for path in ("/livez", "/healthz"):  # alive, and nothing more told to the public
            assert await http(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()) == (200, b'{"status": "ok"}')
        assert (await http(port, b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n"))[0] == 404
        assert (await http(port, b"GET /twilio/voice HTTP/1.1\r\nHost: x\r\n\r\n"))[0] == 405
        assert (await http(port, b"garbage\r\n\r\n"))[0] == 400
        with pytest.raises(HandshakeError):
            async with open_websocket_url(f"ws://127.0.0.1:{port}/media/other"):
                pass
    await with_server(tmp_path, check)


async def test_the_voice_webhook_answers_twiml_with_a_per_call_token(tmp_path, autojump_clock):
    async def check(port):
        status, body = await http(port, post("/twilio/voice", "CallSid=CA42&From=%2B15551234&To=%2B15559876"))
        assert status == 200
        path, parameters = stream_from_twiml(body.decode())
        assert f'url="wss://{PUBLIC_HOST}/media/twilio"' in body.decode() and path == "/media/twilio"
        assert twilio.stream_token_problem("shared", "CA42", parameters, time.time()) is None
        assert parameters["from"] == "+15551234"
        assert (await http(port, post("/twilio/voice", "From=%2B1555")))[0] == 400
    await with_server(tmp_path, check, stream_token_secret="shared")


async def test_a_webhook_without_a_valid_twilio_signature_is_refused(tmp_path, autojump_clock):
    form = {"CallSid": "CA42", "From": "+15551234"}
    good = twilio.request_signature(AUTH_TOKEN, f"https://{PUBLIC_HOST}/twilio/voice", form)

    async def check(port):
        body = "CallSid=CA42&From=%2B15551234"
        assert (await http(port, post("/twilio/voice", body)))[0] == 403
        assert (await http(port, post("/twilio/voice", body, signature="AAAA")))[0] == 403
        assert (await http(port, post("/twilio/voice", body, signature=good)))[0] == 200
        with pytest.raises(HandshakeError):
            async with open_websocket_url(f"ws://127.0.0.1:{port}/media/twilio"):
                pass
        upgrade_signature = twilio.request_signature(AUTH_TOKEN, f"wss://{PUBLIC_HOST}/media/twilio", {})
        async with open_websocket_url(f"ws://127.0.0.1:{port}/media/twilio",
                                      extra_headers=[(b"X-Twilio-Signature", upgrade_signature.encode())]):
            pass
    await with_server(tmp_path, check, twilio_auth_token=AUTH_TOKEN)


async def test_clients_that_hang_up_during_an_upgrade_never_take_the_server_down(tmp_path, autojump_clock):
    upgrade = ("GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")

    async def check(port):
        for path in ("/nowhere", "/media/twilio"):  # a 404 and, unsigned, a 403 to a client already gone
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(upgrade.format(path=path).encode())
            await stream.aclose()
            await trio.sleep(0.1)
        assert (await http(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"))[0] == 200
    await with_server(tmp_path, check, twilio_auth_token=AUTH_TOKEN)


async def test_the_webhook_passes_a_numbers_business_and_barge_in_choice_to_the_stream(tmp_path, autojump_clock):
    async def check(port):
        status, body = await http(port, post("/twilio/voice?business_id=3&barge_in=false&other=x", "CallSid=CA9"))
        _, parameters = stream_from_twiml(body.decode())
        assert (status, parameters["business_id"], parameters["barge_in"]) == (200, "3", "false")
        assert "other" not in parameters
    await with_server(tmp_path, check)


HEALTH = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
HEALTH_AND_CLOSE = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


async def test_a_connection_serves_requests_until_the_client_says_close(tmp_path, autojump_clock):
    async def check(port):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            # Pipelined: the third asks to close, so the server must not wait out the idle timeout.
            await stream.send_all(HEALTH + HEALTH + HEALTH.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
            response = b""
            with trio.fail_after(KEEP_ALIVE_IDLE_S / 2):
                while chunk := await stream.receive_some(65536):
                    response += chunk
        assert response.count(b"HTTP/1.1 200 ") == 3
        assert response.lower().count(b"connection: close") == 1
    await with_server(tmp_path, check)


async def test_an_idle_kept_alive_connection_is_closed_after_the_idle_timeout(tmp_path, autojump_clock):
    async def check(port):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(HEALTH)
            response = b""
            while not response.endswith(b"}"):
                response += await stream.receive_some(65536)
            with trio.move_on_after(KEEP_ALIVE_IDLE_S - 1) as still_open:
                await stream.receive_some(65536)
            assert still_open.cancelled_caught
            with trio.fail_after(2):
                assert await stream.receive_some(65536) == b""
    await with_server(tmp_path, check)


async def with_router(router: Router, test) -> None:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, router.handle_connection, 0, host="127.0.0.1"))
        await test(listeners[0].socket.getsockname()[1])
        nursery.cancel_scope.cancel()


async def test_a_handler_may_take_longer_than_the_request_timeout(autojump_clock):
    async def slow(request: HttpRequest) -> HttpResponse:
        await trio.sleep(REQUEST_TIMEOUT_S * 3)
        return HttpResponse(200, b"done")

    router = Router()
    router.http("GET", "/slow", slow)

    async def check(port):
        assert await http(port, b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n") == (200, b"done")
    await with_router(router, check)


async def test_a_client_that_stalls_in_its_body_is_cut_off_at_the_request_timeout(autojump_clock):
    async def check(port):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(post("/twilio/voice", "CallSid=CA42")[:-4])
            started = trio.current_time()
            assert await stream.receive_some(65536) == b""
            assert REQUEST_TIMEOUT_S <= trio.current_time() - started < REQUEST_TIMEOUT_S + 1
    await with_router(Router(), check)


async def test_only_a_route_that_may_hold_is_cancelled_when_its_client_hangs_up(autojump_clock):
    endings: dict[str, str] = {}

    def handler_ending_in(name: str):
        async def handler(request: HttpRequest) -> HttpResponse:
            try:
                await trio.sleep(5)
            except trio.Cancelled:
                endings[name] = "cancelled"
                raise
            endings[name] = "answered"
            return HttpResponse(200, b"late")
        return handler

    router = Router()
    router.http("GET", "/hold", handler_ending_in("hold"), may_hold=True)
    router.http("GET", "/quick", handler_ending_in("quick"))

    async def check(port):
        for path in ("/hold", "/quick"):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            await trio.sleep(1)
            await stream.aclose()
        await trio.sleep(10)
    await with_router(router, check)
    assert endings == {"hold": "cancelled", "quick": "answered"}


async def test_a_request_read_in_the_turn_its_deadline_passed_never_starts_a_handler(mock_clock):
    started = []

    async def handler(request: HttpRequest) -> HttpResponse:
        started.append(request.path)
        await trio.sleep(0)
        return HttpResponse(200, b"ok")

    router = Router()
    router.http("GET", "/late", handler)

    async def check(port):
        # A plain socket: sending with no checkpoint, the server cannot read before the clock jumps.
        with socket.create_connection(("127.0.0.1", port)) as client:
            await trio.testing.wait_all_tasks_blocked()  # the server waits for the head under its deadline
            client.sendall(b"GET /late HTTP/1.1\r\nHost: x\r\n\r\n")
            mock_clock.jump(REQUEST_TIMEOUT_S + 1)  # the bytes and the deadline reach the server in one turn
            assert await trio.socket.from_stdlib_socket(client).recv(65536) == b""
    await with_router(router, check)
    assert started == []


UPGRADE = ("GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "{key}Sec-WebSocket-Version: 13\r\n\r\n")
KEY = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"


async def until_the_server_closes(stream: trio.abc.Stream) -> bytes:
    """Everything the server sends, read without ever answering, until it closes the connection."""
    received = b""
    while chunk := await stream.receive_some(65536):
        received += chunk
    return received


def open_descriptors() -> int:
    gc.collect()  # sockets earlier tests dropped are closed when collected: not ours to count
    return len(os.listdir("/proc/self/fd"))


async def test_an_upgrade_without_a_key_is_refused_at_once(tmp_path, autojump_clock):
    async def check(port):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(UPGRADE.format(path=MEDIA_PATH, key="").encode())
            with trio.fail_after(1):
                response = await until_the_server_closes(stream)
        assert response.startswith(b"HTTP/1.1 400 ") and response.endswith(b"Sec-WebSocket-Key is required")
    await with_server(tmp_path, check)


@pytest.mark.parametrize(("path", "status"), [("/nowhere", b"404"), (MEDIA_PATH, b"403")])
async def test_a_refused_upgrade_is_closed_by_the_server_whatever_the_client_does(tmp_path, autojump_clock,
                                                                                  path, status):
    async def check(port):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(UPGRADE.format(path=path, key=KEY).encode())
            with trio.fail_after(CLOSE_TIMEOUT_S + 1):
                response = await until_the_server_closes(stream)
        assert response.startswith(b"HTTP/1.1 " + status)
    await with_server(tmp_path, check, twilio_auth_token=AUTH_TOKEN)


async def test_a_stream_that_never_starts_and_never_answers_the_close_is_cut_off(tmp_path, autojump_clock):
    async def check(port):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(UPGRADE.format(path=MEDIA_PATH, key=KEY).encode())
            with trio.fail_after(START_TIMEOUT_S + CLOSE_TIMEOUT_S + 1):
                received = await until_the_server_closes(stream)
        assert received.startswith(b"HTTP/1.1 101 ")
        assert b"\x88" in received.partition(b"\r\n\r\n")[2][:1]  # the server's close frame, never answered
    await with_server(tmp_path, check)


async def test_hostile_connections_leave_no_descriptor_behind(tmp_path, autojump_clock):
    requests = [UPGRADE.format(path=MEDIA_PATH, key=""), UPGRADE.format(path="/nowhere", key=KEY),
                UPGRADE.format(path=MEDIA_PATH, key=KEY), "GET /healthz HTTP/1.1\r\nHost: x\r\n"]  # the last, unfinished

    async def check(port):
        await http(port, HEALTH)
        baseline = open_descriptors()

        async def hostile(request: str) -> None:
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                await stream.send_all(request.encode())
                await until_the_server_closes(stream)

        with trio.fail_after(START_TIMEOUT_S + CLOSE_TIMEOUT_S + 1):
            async with trio.open_nursery() as clients:
                for request in requests * 25:
                    clients.start_soon(hostile, request)
        await trio.sleep(0.1)
        assert open_descriptors() == baseline
    await with_server(tmp_path, check)


async def test_an_upgrade_the_websocket_library_refuses_is_closed_at_once(tmp_path, autojump_clock):
    async def check(port):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            upgrade = UPGRADE.format(path=MEDIA_PATH, key=KEY).replace("Connection: Upgrade", "Connection: keep-alive")
            await stream.send_all(upgrade.encode())
            with trio.fail_after(1):
                assert (await until_the_server_closes(stream)).startswith(b"HTTP/1.1 400 ")
    await with_server(tmp_path, check)


# On the real clock (the database check runs in a thread), so each asks to close rather than idle 30 s.
READY = b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
ALIVE = b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


async def test_a_database_gone_makes_the_server_unready_and_alive(postgres_database_url, tmp_path):
    settings = Settings(database_url=postgres_database_url, spill_dir=str(tmp_path / "spill"), port=0, public_host=PUBLIC_HOST)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve, settings)
        assert await http(port, READY) == (200, b'{"status": "ready"}')
        server_url, name = postgres_database_url.rsplit("/", 1)
        await trio.to_thread.run_sync(run_outside_transaction, server_url + "/postgres",
                                      f'DROP DATABASE "{name}" WITH (FORCE)')
        for _ in range(2):  # the dead connection is dropped, and a new one cannot be made
            status, body = await http(port, READY)
            assert (status, json.loads(body)) == (503, {"status": "not ready", "problems": [
                "database unreachable (OperationalError)"]})
        assert (await http(port, ALIVE))[0] == 200
        nursery.cancel_scope.cancel()


async def test_a_writer_backlog_at_its_bound_makes_the_server_unready(tmp_path):
    database = open_database(f"sqlite:///{tmp_path / 'r.db'}")
    writers = StorageWriters(StorageWriter(database), StorageWriter(database, capacity=2))
    server = CallgateServer(Settings(), ModelEndpoint("ws://127.0.0.1:1", "m", "k"), writers, database)
    writers.statuses.submit(WhatsappStatusRecord("wamid.1", "sent", None, None, None))
    assert (await server.readyz(None)).status == 200
    writers.statuses.submit(WhatsappStatusRecord("wamid.2", "sent", None, None, None))
    response = await server.readyz(None)
    assert (response.status, json.loads(response.body)["problems"]) == (
        503, ["storage writer backlog over its bound (whatsapp statuses)"])


async def closed_at_once(port: int) -> bool:
    """Whether the server closes a new connection before it sends anything."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        with trio.move_on_after(0.5):
            try:
                return await stream.receive_some() == b""
            except trio.BrokenResourceError:
                return True  # reset
    return False


async def test_five_hundred_idle_connections_are_cut_off_and_never_crowd_out_a_caller(tmp_path, autojump_clock):
    async def check(port):
        await http(port, HEALTH_AND_CLOSE)
        baseline = open_descriptors()
        idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(500)]
        assert await http(port, HEALTH_AND_CLOSE) == (200, b'{"status": "ok"}')
        with trio.fail_after(REQUEST_TIMEOUT_S + 1):
            for stream in idle:
                assert await until_the_server_closes(stream) == b""
        for stream in idle:
            await stream.aclose()
        await trio.sleep(0.1)
        assert open_descriptors() == baseline
    await with_server(tmp_path, check, max_connections_per_ip=0)


@pytest.mark.parametrize("caps, cap_log", [
    ({"max_connections_per_ip": 3}, "open=3 from='127.0.0.1'"),
    ({"max_connections": 3, "max_connections_per_ip": 0}, "open=3 from='all addresses'"),
])
async def test_past_a_connection_cap_new_connections_are_closed_at_once_until_one_closes(
        tmp_path, autojump_clock, caplog, caps, cap_log):
    caplog.set_level(logging.INFO, logger="callgate")

    async def check(port):
        holders = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(3)]
        await trio.sleep(0.1)
        assert [await closed_at_once(port) for _ in range(2)] == [True, True]
        await holders.pop().aclose()
        await trio.sleep(0.1)
        assert await http(port, HEALTH_AND_CLOSE) == (200, b'{"status": "ok"}')
        for stream in holders:
            await stream.aclose()
    await with_server(tmp_path, check, **caps)
    lines = [record.getMessage() for record in caplog.records if "connections" in record.getMessage()]
    assert lines == [f"call=- [HTTP] connections refused until some close {cap_log}",
                     f"call=- [HTTP] connections accepted again refused=2 {cap_log.split(' ', 1)[1]}"]


class _PeerStream:
    """A connection from a given client address, as a socket stream reports it; closing is all it does."""

    def __init__(self, address: str) -> None:
        self.socket = type("PeerSocket", (), {"getpeername": lambda _self: (address, 40000)})()
        self.closed = False

    async def aclose(self) -> None:
        self.closed = True


async def test_connections_past_a_cap_are_closed_unserved_and_served_again_once_one_closes(caplog):
    caplog.set_level(logging.WARNING, logger="callgate.http")
    served: list[str] = []
    may_close = {address: trio.Event() for address in ("10.0.0.1", "10.0.0.2")}

    async def serve_one(stream):
        address = stream.socket.getpeername()[0]
        served.append(address)
        await may_close[address].wait()

    limits = ConnectionLimits(serve_one, total=3, per_address=2)
    async with trio.open_nursery() as nursery:
        streams = [_PeerStream(address) for address in ("10.0.0.1", "10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.2")]
        for stream in streams:
            nursery.start_soon(limits.handle_connection, stream)
            await trio.testing.wait_all_tasks_blocked()
        # The third from 10.0.0.1 passed its address's cap; the second from 10.0.0.2 the cap on all.
        assert served == ["10.0.0.1", "10.0.0.1", "10.0.0.2"] and limits.open_count == 3
        assert [stream.closed for stream in streams] == [False, False, True, False, True]
        may_close["10.0.0.1"].set()
        await trio.testing.wait_all_tasks_blocked()
        assert limits.open_count == 1 and dict(limits._open_by_address) == {"10.0.0.2": 1}
        may_close["10.0.0.1"] = trio.Event()
        nursery.start_soon(limits.handle_connection, _PeerStream("10.0.0.1"))
        await trio.testing.wait_all_tasks_blocked()
        assert served[-1] == "10.0.0.1" and limits.open_count == 2
        for closes in may_close.values():
            closes.set()
    assert limits.open_count == 0 and not limits._open_by_address
    assert [record.getMessage() for record in caplog.records if record.name == "callgate.http"] == [
        "call=- [HTTP] connections refused until some close open=2 from='10.0.0.1'",
        "call=- [HTTP] connections refused until some close open=3 from='all addresses'",
        "call=- [HTTP] connections accepted again refused=1 from='all addresses'",
        "call=- [HTTP] connections accepted again refused=1 from='10.0.0.1'",
    ]


async def test_a_flood_past_the_cap_logs_once_as_it_starts_and_once_with_its_count_as_it_ends(caplog):
    caplog.set_level(logging.WARNING, logger="callgate.http")
    release = trio.Event()

    async def serve_one(stream):
        await release.wait()

    limits = ConnectionLimits(serve_one, total=1, per_address=0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(limits.handle_connection, trio.testing.MemorySendStream())
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(4):
            await limits.handle_connection(trio.testing.MemorySendStream())
        release.set()
    await limits.handle_connection(trio.testing.MemorySendStream())
    assert [record.getMessage() for record in caplog.records if record.name == "callgate.http"] == [
        "call=- [HTTP] connections refused until some close open=1 from='all addresses'",
        "call=- [HTTP] connections accepted again refused=4 from='all addresses'",
    ]


def test_a_form_keeps_its_blank_fields_and_survives_bytes_that_are_not_utf8():
    """Twilio signs every field it posts, blank ones too: a dropped blank field would fail the signature."""
    request = HttpRequest("POST", "/twilio/voice", {}, b"CallSid=CA1&CallerName=&Note=caf%C3%A9&Raw=\xff")
    assert request.form() == {"CallSid": "CA1", "CallerName": "", "Note": "café", "Raw": "\ufffd"}


async def test_a_path_with_named_parts_matches_one_segment_per_part_and_says_what_is_wrong_otherwise(autojump_clock):
    async def messages(request: HttpRequest) -> HttpResponse:
        return HttpResponse.json(200, {"path": request.path})

    router = Router()
    router.http("POST", "/{version}/{phone_number_id}/messages", messages)
    router.http("GET", "/v1.0/literal", messages)

    async def check(port):
        head, body = await http_head_and_body(
            port, b"POST /v21.0/1234/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        assert head.split(b"\r\n")[0] == b"HTTP/1.1 200 "
        assert b"\r\ncontent-type: application/json\r\n" in head.lower()
        assert b"\r\ncontent-length: %d" % len(body) in head.lower()
        assert json.loads(body) == {"path": "/v21.0/1234/messages"}
        for path in ("/v21.0/1234/5/messages", "/v21.0/messages", "/v21.0/1234/messages/x", "/v1x0/literal"):
            request = f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
            assert await http(port, request) == (404, b"not found"), path
        request = b"GET /v21.0/1234/messages HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        assert await http(port, request) == (405, b"method not allowed")
    await with_router(router, check)


async def test_a_body_of_the_largest_size_is_read_and_one_byte_more_refused(autojump_clock, caplog):
    async def size(request: HttpRequest) -> HttpResponse:
        return HttpResponse(200, str(len(request.body)).encode())

    router = Router()
    router.http("POST", "/size", size)

    def posting(length: int) -> bytes:
        return (f"POST /size HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n".encode()
                + b"x" * length)

    async def check(port):
        assert await http(port, posting(MAX_BODY_BYTES)) == (200, str(MAX_BODY_BYTES).encode())
        assert (await http(port, posting(MAX_BODY_BYTES + 1)))[0] == 400
    with caplog.at_level(logging.WARNING, logger="callgate.http"):
        await with_router(router, check)
    assert [record.getMessage() for record in caplog.records if record.name == "callgate.http"] == [
        f"call=- [HTTP] bad request refused why='request body over {MAX_BODY_BYTES} bytes'"]


async def test_a_websocket_at_no_route_is_refused_with_a_reason(tmp_path, autojump_clock):
    async def check(port):
        with pytest.raises(ConnectionRejected) as refusal:
            async with open_websocket_url(f"ws://127.0.0.1:{port}/media/other"):
                pass
        assert (refusal.value.status_code, refusal.value.body) == (404, b"no WebSocket at this path")
    await with_server(tmp_path, check)
