"""One port for plain HTTP and WebSocket: h11 reads the request head, then either answers it or
hands the untouched bytes to trio-websocket for the upgrade. Plain HTTP connections are kept alive
(HTTP/1.1) until the client says `Connection: close` or stays idle for KEEP_ALIVE_IDLE_S."""

from __future__ import annotations

import collections
import json
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Awaitable, Callable
from urllib.parse import parse_qsl, urlsplit

import h11
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, wrap_server_stream

logger = logging.getLogger("callgate.http")

MAX_HEAD_BYTES = 16 * 1024
MAX_BODY_BYTES = 1024 * 1024
REQUEST_TIMEOUT_S = 10
KEEP_ALIVE_IDLE_S = 30
CLOSE_TIMEOUT_S = 2  # for the client's answer to our close; a client that never answers is cut off
CARRIER_MAX_MESSAGE_BYTES = 64 * 1024  # a Twilio frame is well under 1 KiB; a big one is an attack


@dataclass(frozen=True)
class HttpRequest:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, str]:
        return dict(parse_qsl(urlsplit(self.target).query))

    def form(self) -> dict[str, str]:
        return dict(parse_qsl(self.body.decode("utf-8", "replace"), keep_blank_values=True))


@dataclass(frozen=True)
class HttpResponse:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, status: int, value: object) -> "HttpResponse":
        return cls(status, json.dumps(value).encode(), "application/json")


HttpHandler = Callable[[HttpRequest], Awaitable[HttpResponse]]
WebSocketHandler = Callable[[WebSocketRequest], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class HttpRoute:
    handler: HttpHandler
    may_hold: bool  # watched for the client hanging up, at the cost of a task per request


class _ReplayStream(trio.abc.Stream):
    """The client's stream with the bytes we already read put back in front, for the WebSocket handshake."""

    def __init__(self, stream: trio.abc.Stream, already_read: bytes) -> None:
        self._stream = stream
        self._already_read = already_read

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._already_read:
            size = len(self._already_read) if max_bytes is None else max_bytes
            chunk, self._already_read = self._already_read[:size], self._already_read[size:]
            await trio.lowlevel.checkpoint()
            return chunk
        return await self._stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()


class Router:
    """Routes by (method, path) for HTTP and by path for WebSocket upgrades. An HTTP path may hold
    `{name}` segments, each matching one non-empty path segment."""

    def __init__(self) -> None:
        self._http: dict[tuple[str, str], HttpRoute] = {}
        self._http_patterns: list[tuple[str, re.Pattern[str], HttpRoute]] = []
        self._websocket: dict[str, WebSocketHandler] = {}

    def http(self, method: str, path: str, handler: HttpHandler, *, may_hold: bool = False) -> None:
        """Route to `handler`. One that `may_hold` a request open for long is cancelled when the client hangs up."""
        route = HttpRoute(handler, may_hold)
        if "{" in path:
            pattern = re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(path))
            self._http_patterns.append((method, re.compile(pattern), route))
        else:
            self._http[(method, path)] = route

    def websocket(self, path: str, handler: WebSocketHandler) -> None:
        self._websocket[path] = handler

    async def handle_connection(self, stream: trio.abc.Stream) -> None:
        """Serve one TCP connection: HTTP requests one after another while the client keeps it
        alive, or one WebSocket for as long as it lives. Always closes the stream on the way out."""
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        try:
            await self._serve_requests(connection, stream)
        except h11.RemoteProtocolError as error:
            logger.warning("call=- [HTTP] bad request refused why=%r", str(error))
            await _send_bad_request(stream, str(error))
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, ConnectionClosed) as error:
            logger.warning("call=- [HTTP] client went away why=%r", type(error).__name__)
        except Exception:
            # Whatever one connection does wrong must not reach serve_tcp and end every call.
            logger.exception("call=- [HTTP] connection failed")
        finally:
            await stream.aclose()

    async def _serve_requests(self, connection: h11.Connection, stream: trio.abc.Stream) -> None:
        # One deadline for the connection, moved at each phase: a timeout scope per phase cost a third of a request.
        with trio.CancelScope() as timer:
            idle = False  # waiting for a kept-alive connection's next request, whose silence ends it quietly
            while True:
                # Bytes of this request onward, pipelined ones included, for a WebSocket handshake replay.
                received = bytearray(connection.trailing_data[0])
                timer.deadline = trio.current_time() + (KEEP_ALIVE_IDLE_S if idle else REQUEST_TIMEOUT_S)
                request = await _next_h11_event(connection, stream, received)
                # A deadline that passed in the turn the bytes came in has cancelled the scope for good: too late.
                if timer.cancel_called or not isinstance(request, h11.Request):
                    break
                idle = False
                headers = {name.decode().lower(): value.decode("latin-1") for name, value in request.headers}
                if headers.get("upgrade", "").lower() == "websocket":
                    refusal = _websocket_handshake_refusal(headers)
                    if refusal is not None:
                        logger.warning("call=- [HTTP] WebSocket upgrade refused why=%r", refusal)
                        await _send_response(connection, stream, HttpResponse(400, refusal.encode()))
                        return
                    timer.deadline = math.inf  # each phase of the WebSocket bounds itself
                    await self._serve_websocket(_ReplayStream(stream, bytes(received)))
                    return
                body = await _read_body(connection, stream, received)
                if timer.cancel_called:
                    break
                http_request = HttpRequest(request.method.decode(), request.target.decode(), headers, body)
                timer.deadline = math.inf  # the request timeout guards against slow clients, not our own handlers
                response = await self._answer(connection, stream, http_request)
                if response is None:
                    return
                timer.deadline = trio.current_time() + REQUEST_TIMEOUT_S
                await _send_response(connection, stream, response)
                if connection.our_state is not h11.DONE or connection.their_state is not h11.DONE:
                    return
                connection.start_next_cycle()
                idle = True
        if timer.cancel_called and not idle:
            raise trio.TooSlowError

    async def _answer(self, connection: h11.Connection, stream: trio.abc.Stream,
                      request: HttpRequest) -> HttpResponse | None:
        route = self._route_for(request)
        if route is None:
            known_path = (any(path == request.path for _, path in self._http)
                          or any(pattern.fullmatch(request.path) for _, pattern, _ in self._http_patterns))
            return HttpResponse(405 if known_path else 404, b"method not allowed" if known_path else b"not found")
        if route.may_hold:
            return await _answer_while_client_stays(connection, stream, route.handler, request)
        return await route.handler(request)

    def _route_for(self, request: HttpRequest) -> HttpRoute | None:
        route = self._http.get((request.method, request.path))
        if route is not None:
            return route
        return next((route for method, pattern, route in self._http_patterns
                     if method == request.method and pattern.fullmatch(request.path)), None)

    async def _serve_websocket(self, stream: trio.abc.Stream) -> None:
        async with trio.open_nursery() as nursery:
            ws_request = await wrap_server_stream(nursery, stream, max_message_size=CARRIER_MAX_MESSAGE_BYTES)
            handler = self._websocket.get(urlsplit(ws_request.path).path)
            if handler is None:
                await ws_request.reject(404, body=b"no WebSocket at this path")
            else:
                await handler(ws_request)
            # The library's reader task waits on the client, which may never close: the connection ends with us.
            nursery.cancel_scope.cancel()


class ConnectionLimits:
    """Caps open connections, in all and per client address (0: no cap per address); past a cap a new
    connection is closed at once, before a byte is read: a flood costs a descriptor for an instant."""

    ALL_ADDRESSES = "all addresses"

    def __init__(self, handle_connection: Callable[[trio.abc.Stream], Awaitable[None]], *,
                 total: int, per_address: int) -> None:
        self._handle_connection = handle_connection
        self.total = total
        self.per_address = per_address
        self.open_count = 0
        self._open_by_address: collections.Counter[str] = collections.Counter()
        # Refusals since the last log line, by the cap passed (an address, or ALL_ADDRESSES): a flood logs twice.
        self._refused: dict[str, int] = {}

    async def handle_connection(self, stream: trio.abc.Stream) -> None:
        address = _peer_address(stream)
        cap = self._cap_passed_by_one_more(address)
        if cap is not None:
            self._refuse(cap)
            await trio.aclose_forcefully(stream)
            return
        self._accept_again(address)
        self.open_count += 1
        self._open_by_address[address] += 1
        try:
            await self._handle_connection(stream)
        finally:
            self.open_count -= 1
            self._open_by_address[address] -= 1
            if not self._open_by_address[address]:
                del self._open_by_address[address]

    def _cap_passed_by_one_more(self, address: str) -> str | None:
        if self.open_count >= self.total:
            return self.ALL_ADDRESSES
        if self.per_address and self._open_by_address[address] >= self.per_address:
            return address
        return None

    def _refuse(self, cap: str) -> None:
        if cap not in self._refused:
            limit = self.total if cap == self.ALL_ADDRESSES else self.per_address
            logger.warning("call=- [HTTP] connections refused until some close open=%d from=%r", limit, cap)
        self._refused[cap] = self._refused.get(cap, 0) + 1

    def _accept_again(self, address: str) -> None:
        for cap in (self.ALL_ADDRESSES, address):
            if cap in self._refused:
                logger.warning("call=- [HTTP] connections accepted again refused=%d from=%r",
                               self._refused.pop(cap), cap)


def _peer_address(stream: trio.abc.Stream) -> str:
    try:
        return str(stream.socket.getpeername()[0])
    except (AttributeError, OSError):
        return "unknown"  # not a socket, or one already reset


def _websocket_handshake_refusal(headers: dict[str, str]) -> str | None:
    """Why an upgrade request cannot become a WebSocket (RFC 6455 4.2.1), or None."""
    if not headers.get("sec-websocket-key"):
        return "Sec-WebSocket-Key is required"
    if headers.get("sec-websocket-version") != "13":
        return "Sec-WebSocket-Version must be 13"
    return None


async def _answer_while_client_stays(
    connection: h11.Connection, stream: trio.abc.Stream, handler: HttpHandler, request: HttpRequest
) -> HttpResponse | None:
    """Run the handler, cancelling it if the client closes the connection meanwhile (then None;
    a client that shuts its sending side counts as gone)."""
    response = None

    async def cancel_on_hang_up(handler_scope: trio.CancelScope) -> None:
        try:
            chunk = await stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            chunk = b""  # a reset is a hang-up too; raised here it would arrive wrapped in a group
        if chunk:
            connection.receive_data(chunk)  # a pipelined next request: keep it, stop watching
        else:
            handler_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(cancel_on_hang_up, nursery.cancel_scope)
        response = await handler(request)
        nursery.cancel_scope.cancel()
    return response


async def _receive_into(stream: trio.abc.Stream, received: bytearray) -> bytes:
    chunk = await stream.receive_some(65536)
    received.extend(chunk)
    return chunk


async def _next_h11_event(connection: h11.Connection, stream: trio.abc.Stream, received: bytearray) -> object:
    while True:
        event = connection.next_event()
        if event is not h11.NEED_DATA:
            return event
        connection.receive_data(await _receive_into(stream, received))


async def _read_body(connection: h11.Connection, stream: trio.abc.Stream, received: bytearray) -> bytes:
    body = bytearray()
    while True:
        event = await _next_h11_event(connection, stream, received)
        if isinstance(event, h11.Data):
            body.extend(event.data)
            if len(body) > MAX_BODY_BYTES:
                raise h11.RemoteProtocolError(f"request body over {MAX_BODY_BYTES} bytes")
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            return bytes(body)


async def _send_bad_request(stream: trio.abc.Stream, reason: str) -> None:
    """Written by hand: after a protocol error h11 no longer lets us speak."""
    body = f"bad request: {reason}".encode()
    head = f"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    try:
        await stream.send_all(head.encode() + body)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _send_response(connection: h11.Connection, stream: trio.abc.Stream, response: HttpResponse) -> None:
    headers = [
        ("Content-Type", response.content_type),
        ("Content-Length", str(len(response.body))),
        *response.headers.items(),
    ]
    head = connection.send(h11.Response(status_code=response.status, headers=headers))
    await stream.send_all(head + connection.send(h11.Data(data=response.body)) + connection.send(h11.EndOfMessage()))
