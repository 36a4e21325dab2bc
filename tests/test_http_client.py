"""The lean HTTP/1.1 client against real loopback servers: kept-alive reuse, the bound on open
connections, connections the server closed, TLS directly and through a CONNECT proxy, and for each
failure whether the request can have reached the server. Timeouts run on the real clock (short ones): the servers that never
answer make the outcome certain, whatever the machine's load."""

from __future__ import annotations

import base64
import ssl
from functools import partial

import h11
import pytest
import trio
import trustme

from app.http import HttpRequest, HttpResponse, Router
from app.http_client import (
    IDLE_EXPIRY_S, HttpClient, NoAnswer, Proxy, RequestNotSent, https_proxy_for, split_url,
)

JSON = {"Content-Type": "application/json"}


async def serve(nursery: trio.Nursery, handle_connection, **ssl_options) -> int:
    serve_function = trio.serve_ssl_over_tcp if ssl_options else trio.serve_tcp
    listeners = await nursery.start(partial(serve_function, handle_connection, 0, host="127.0.0.1", **ssl_options))
    return listeners[0].transport_listener.socket.getsockname()[1] if ssl_options else \
        listeners[0].socket.getsockname()[1]


def echo_router(seen: list[HttpRequest]) -> Router:
    async def echo(request: HttpRequest) -> HttpResponse:
        seen.append(request)
        return HttpResponse(201, b"echo " + request.body, "application/json")

    router = Router()
    router.http("POST", "/v1/echo", echo)
    return router


async def read_request(stream: trio.abc.Stream, connection: h11.Connection) -> None:
    while not isinstance(event := connection.next_event(), h11.EndOfMessage):
        if event is h11.NEED_DATA:
            connection.receive_data(await stream.receive_some(65536))


def test_urls_split_into_origin_and_target():
    origin, target = split_url("https://graph.facebook.com/v21.0/1065/messages?x=1")
    assert (origin.scheme, origin.host, origin.port, origin.host_header, target) == (
        "https", "graph.facebook.com", 443, "graph.facebook.com", "/v21.0/1065/messages?x=1")
    assert split_url("http://127.0.0.1:8090")[0].host_header == "127.0.0.1:8090"
    with pytest.raises(ValueError):
        split_url("ftp://example.com/file")


async def test_a_header_h11_cannot_send_is_a_value_error_before_anything_is_sent():
    async with HttpClient(max_connections=1, timeout_s=5) as client:
        with pytest.raises(ValueError, match="cannot send this request"):
            await client.post("http://127.0.0.1:9/", b"{}", {"Authorization": "Bearer token\n"})
        assert client.connections_opened == 0


async def test_requests_one_after_another_share_one_kept_alive_connection():
    seen: list[HttpRequest] = []
    async with trio.open_nursery() as nursery:
        port = await serve(nursery, echo_router(seen).handle_connection)
        async with HttpClient(max_connections=4, timeout_s=5) as client:
            for index in range(20):
                answer = await client.post(f"http://127.0.0.1:{port}/v1/echo", f"[{index}]".encode(), JSON)
                assert (answer.status, answer.body) == (201, f"echo [{index}]".encode())
            assert client.connections_opened == 1
        nursery.cancel_scope.cancel()
    assert seen[0].headers["host"] == f"127.0.0.1:{port}"
    assert (seen[0].headers["content-type"], seen[0].headers["content-length"]) == ("application/json", "3")


async def test_concurrent_requests_never_open_more_connections_than_the_bound():
    in_handler = 0
    most_at_once = 0

    async def slow(request: HttpRequest) -> HttpResponse:
        nonlocal in_handler, most_at_once
        in_handler += 1
        most_at_once = max(most_at_once, in_handler)
        await trio.sleep(0.05)
        in_handler -= 1
        return HttpResponse(200, b"{}")

    router = Router()
    router.http("POST", "/slow", slow)
    async with trio.open_nursery() as nursery:
        port = await serve(nursery, router.handle_connection)
        async with HttpClient(max_connections=3, timeout_s=30) as client, trio.open_nursery() as senders:
            for _ in range(12):
                senders.start_soon(client.post, f"http://127.0.0.1:{port}/slow", b"{}", JSON)
        nursery.cancel_scope.cancel()
    assert (most_at_once, client.connections_opened) == (3, 3)


async def test_no_free_connection_in_time_means_not_sent_and_no_answer_in_time_means_unknown():
    held = trio.Event()

    async def hold(request: HttpRequest) -> HttpResponse:
        held.set()
        await trio.sleep_forever()

    router = Router()
    router.http("POST", "/hold", hold, may_hold=True)
    async with trio.open_nursery() as nursery:
        port = await serve(nursery, router.handle_connection)
        outcomes = []
        async with HttpClient(max_connections=1, timeout_s=1.0, pool_timeout_s=0.1) as client:

            async def send(name: str) -> None:
                try:
                    await client.post(f"http://127.0.0.1:{port}/hold", b"{}", JSON)
                except (RequestNotSent, NoAnswer) as error:
                    outcomes.append((name, type(error).__name__, str(error)))

            async with trio.open_nursery() as senders:
                senders.start_soon(send, "first")
                await held.wait()
                senders.start_soon(send, "second")
        nursery.cancel_scope.cancel()
    assert outcomes == [("second", "RequestNotSent", "no free connection within 0.1 s"),
                        ("first", "NoAnswer", "no answer within 1 s")]


async def test_a_refused_connection_is_not_sent():
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # bound once, now nobody listens there
    async with HttpClient(max_connections=1, timeout_s=5) as client:
        with pytest.raises(RequestNotSent, match="cannot connect"):
            await client.post(f"http://127.0.0.1:{port}/", b"{}", JSON)


async def test_a_server_that_hangs_up_after_reading_the_request_gives_no_answer():
    async def read_then_hang_up(stream: trio.SocketStream) -> None:
        async with stream:
            await read_request(stream, h11.Connection(h11.SERVER))

    async with trio.open_nursery() as nursery:
        port = await serve(nursery, read_then_hang_up)
        async with HttpClient(max_connections=1, timeout_s=5) as client:
            with pytest.raises(NoAnswer, match="closed the connection before its answer was complete"):
                await client.post(f"http://127.0.0.1:{port}/", b"{}", JSON)
        nursery.cancel_scope.cancel()


async def test_a_connection_the_server_closed_while_idle_is_never_written_into():
    """The server answers as if keeping the connection alive, then closes it: the next request must
    go out on a new connection, not be lost into the closed one."""
    requests_seen = 0

    async def answer_once_then_close(stream: trio.SocketStream) -> None:
        nonlocal requests_seen
        async with stream:
            connection = h11.Connection(h11.SERVER)
            await read_request(stream, connection)
            requests_seen += 1
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")

    async with trio.open_nursery() as nursery:
        port = await serve(nursery, answer_once_then_close)
        async with HttpClient(max_connections=1, timeout_s=5) as client:
            assert (await client.post(f"http://127.0.0.1:{port}/", b"{}", JSON)).status == 200
            await trio.sleep(0.2)  # the server's close reaches this end
            assert (await client.post(f"http://127.0.0.1:{port}/", b"{}", JSON)).status == 200
            assert (client.connections_opened, requests_seen) == (2, 2)
        nursery.cancel_scope.cancel()


async def test_connections_idle_past_the_expiry_are_not_reused(autojump_clock):
    seen: list[HttpRequest] = []
    async with trio.open_nursery() as nursery:
        port = await serve(nursery, echo_router(seen).handle_connection)
        async with HttpClient(max_connections=1, timeout_s=5) as client:
            await client.post(f"http://127.0.0.1:{port}/v1/echo", b"{}", JSON)
            await trio.sleep(IDLE_EXPIRY_S / 2)
            await client.post(f"http://127.0.0.1:{port}/v1/echo", b"{}", JSON)
            assert client.connections_opened == 1
            await trio.sleep(IDLE_EXPIRY_S + 0.1)
            await client.post(f"http://127.0.0.1:{port}/v1/echo", b"{}", JSON)
            assert client.connections_opened == 2
        nursery.cancel_scope.cancel()


def answering_each_request_with(raw_answer: bytes):
    """A server that reads one request per connection and writes `raw_answer` as it is, then waits."""
    async def answer(stream: trio.SocketStream) -> None:
        async with stream:
            await read_request(stream, h11.Connection(h11.SERVER))
            await stream.send_all(raw_answer)
            await trio.sleep_forever()
    return answer


async def test_a_chunked_answer_is_read_whole_and_connection_close_is_honoured():
    chunked_then_close = answering_each_request_with(
        b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"5\r\n{\"a\":\r\n2\r\n1}\r\n0\r\n\r\n")

    async with trio.open_nursery() as nursery:
        port = await serve(nursery, chunked_then_close)
        async with HttpClient(max_connections=1, timeout_s=5) as client:
            for _ in range(2):
                answer = await client.post(f"http://127.0.0.1:{port}/", b"{}", JSON)
                assert (answer.status, answer.body) == (400, b'{"a":1}')
            assert client.connections_opened == 2
        nursery.cancel_scope.cancel()


def tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a certificate for 127.0.0.1, and a client context trusting its test authority."""
    authority = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(server_context)
    trusting_context = ssl.create_default_context()
    authority.configure_trust(trusting_context)
    return server_context, trusting_context


async def test_https_checks_the_servers_certificate():
    server_context, trusting_context = tls_contexts()
    seen: list[HttpRequest] = []
    async with trio.open_nursery() as nursery:
        port = await serve(nursery, echo_router(seen).handle_connection, ssl_context=server_context,
                           https_compatible=True)
        url = f"https://127.0.0.1:{port}/v1/echo"
        async with HttpClient(max_connections=2, timeout_s=5, ssl_context=trusting_context) as client:
            for _ in range(3):
                assert (await client.post(url, b"{}", JSON)).body == b"echo {}"
            assert client.connections_opened == 1
        async with HttpClient(max_connections=2, timeout_s=5) as client:  # the system's roots only
            with pytest.raises(RequestNotSent, match="CERTIFICATE_VERIFY_FAILED"):
                await client.post(url, b"{}", JSON)
        nursery.cancel_scope.cancel()
    assert len(seen) == 3


def test_only_https_goes_through_the_proxy_and_no_proxy_hosts_go_direct():
    proxies = {"https": "http://ops:p%40ss@proxy.internal:3128", "no": "localhost,.example.com"}
    proxy = https_proxy_for(split_url("https://graph.facebook.com/v21.0")[0], proxies)
    assert (proxy.host, proxy.port) == ("proxy.internal", 3128)
    assert proxy.authorization == "Basic " + base64.b64encode(b"ops:p@ss").decode()
    assert https_proxy_for(split_url("https://api.example.com/")[0], proxies) is None
    assert https_proxy_for(split_url("http://127.0.0.1:8090/")[0], proxies) is None
    assert https_proxy_for(split_url("https://graph.facebook.com/")[0], {}) is None
    assert Proxy.from_url("proxy.internal").port == 80
    with pytest.raises(ValueError):
        Proxy.from_url("socks5://proxy.internal:1080")


def tunnel_proxy(requests_seen: list[h11.Request], *, refuse: bool = False):
    """A CONNECT proxy: relays bytes both ways once it has answered 200 (or refuses with 407)."""
    async def relay(source: trio.abc.Stream, sink: trio.abc.Stream, both: trio.CancelScope) -> None:
        while data := await source.receive_some(65536):
            await sink.send_all(data)
        both.cancel()

    async def handle(client: trio.SocketStream) -> None:
        async with client:
            protocol = h11.Connection(h11.SERVER)
            while (request := protocol.next_event()) is h11.NEED_DATA:
                protocol.receive_data(await client.receive_some(65536))
            requests_seen.append(request)
            if refuse:
                await client.send_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
                return
            host, port = request.target.decode().rsplit(":", 1)
            async with await trio.open_tcp_stream(host, int(port)) as upstream, trio.open_nursery() as relays:
                await client.send_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                relays.start_soon(relay, client, upstream, relays.cancel_scope)
                relays.start_soon(relay, upstream, client, relays.cancel_scope)
    return handle


async def test_https_goes_through_a_connect_tunnel_with_the_proxys_credentials():
    server_context, trusting_context = tls_contexts()
    seen: list[HttpRequest] = []
    tunnels: list[h11.Request] = []
    async with trio.open_nursery() as nursery:
        port = await serve(nursery, echo_router(seen).handle_connection, ssl_context=server_context,
                           https_compatible=True)
        proxy_port = await serve(nursery, tunnel_proxy(tunnels))
        proxies = {"https": f"http://ops:p%40ss@127.0.0.1:{proxy_port}"}
        async with HttpClient(max_connections=1, timeout_s=5, ssl_context=trusting_context,
                              proxies=proxies) as client:
            for _ in range(2):
                assert (await client.post(f"https://127.0.0.1:{port}/v1/echo", b"{}", JSON)).body == b"echo {}"
        nursery.cancel_scope.cancel()
    [tunnel] = tunnels
    assert (tunnel.method, tunnel.target) == (b"CONNECT", f"127.0.0.1:{port}".encode())
    assert (b"proxy-authorization", b"Basic " + base64.b64encode(b"ops:p@ss")) in list(tunnel.headers)
    assert [request.headers["host"] for request in seen] == [f"127.0.0.1:{port}"] * 2


async def test_a_tunnel_the_proxy_refuses_is_not_sent():
    tunnels: list[h11.Request] = []
    async with trio.open_nursery() as nursery:
        proxy_port = await serve(nursery, tunnel_proxy(tunnels, refuse=True))
        async with HttpClient(max_connections=1, timeout_s=5, proxies={"https": f"127.0.0.1:{proxy_port}"}) as client:
            with pytest.raises(RequestNotSent, match="refused a tunnel to graph.facebook.com:443: HTTP 407"):
                await client.post("https://graph.facebook.com/v21.0/1065/messages", b"{}", JSON)
        nursery.cancel_scope.cancel()
    assert [tunnel.target for tunnel in tunnels] == [b"graph.facebook.com:443"]


async def test_bytes_after_an_answer_are_never_taken_for_the_next_answer():
    answer_twice = answering_each_request_with(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
                                               b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray")

    async with trio.open_nursery() as nursery:
        port = await serve(nursery, answer_twice)
        async with HttpClient(max_connections=1, timeout_s=5) as client:
            assert (await client.post(f"http://127.0.0.1:{port}/", b"{}", JSON)).body == b"{}"
            assert (await client.post(f"http://127.0.0.1:{port}/", b"{}", JSON)).body == b"{}"
            assert client.connections_opened == 2
        nursery.cancel_scope.cancel()
