"""A lean HTTP/1.1 client for trio, on h11: kept-alive connections per origin, a bound on how many
are open, one timeout for the whole exchange, and errors that say whether the request can have
reached the server, which is what at-most-once sending needs to know.

The broadcast sender's hot path: httpx spent most of a message's CPU in its pool's bookkeeping,
which scans every pooled connection on every request. HTTPS can go through an HTTP proxy
(a CONNECT tunnel), as HTTPS_PROXY and NO_PROXY say."""

from __future__ import annotations

import base64
import ssl
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

import h11
import trio

USER_AGENT = "callgate"
MAX_RESPONSE_BYTES = 1024 * 1024
RECEIVE_SIZE = 65536
# Shorter than the keep-alive timeout of common servers, so we rarely write into a connection they are closing.
IDLE_EXPIRY_S = 4.0
CLOSED_BEFORE_ANSWER = "the server closed the connection before its answer was complete"
_DEFAULT_PORTS = {"http": 80, "https": 443}
_TRANSPORT_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError)


class RequestNotSent(Exception):
    """No byte of the request left this machine (no connection, no free slot): safe to send again."""


class NoAnswer(Exception):
    """The request may have reached the server, but no complete answer came back."""


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    status: int
    body: bytes


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str
    host: str
    port: int

    @property
    def host_header(self) -> str:
        return self.host if self.port == _DEFAULT_PORTS[self.scheme] else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Proxy:
    host: str
    port: int
    authorization: str | None  # the Proxy-Authorization value, from the proxy URL's user and password

    @classmethod
    def from_url(cls, url: str) -> Proxy:
        """`http://[user:password@]host[:port]`; ValueError for anything else."""
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"not an http:// proxy URL: {url!r}")
        authorization = None
        if parts.username is not None:
            credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            authorization = "Basic " + base64.b64encode(credentials).decode()
        return cls(parts.hostname, parts.port or 80, authorization)


def https_proxy_for(origin: Origin, proxies: Mapping[str, str]) -> Proxy | None:
    """The proxy to tunnel through to `origin`, from a urllib-style map ({"https": URL, "no": hosts});
    None to connect directly. Plain http always goes direct: it only ever reaches the local sandbox."""
    if origin.scheme != "https" or not proxies.get("https"):
        return None
    if urllib.request.proxy_bypass_environment(origin.host, dict(proxies)):
        return None
    return Proxy.from_url(proxies["https"])


def request_head_for(method: str, url: str, body_length: int, headers: dict[str, str]) -> tuple[Origin, h11.Request]:
    """The origin and the request head; ValueError for a URL or header h11 would not send."""
    origin, target = split_url(url)
    try:
        return origin, h11.Request(method=method, target=target, headers=[
            ("Host", origin.host_header), ("User-Agent", USER_AGENT), ("Content-Length", str(body_length)),
            *headers.items()])
    except h11.LocalProtocolError as error:
        raise ValueError(f"cannot send this request: {error}") from None


def split_url(url: str) -> tuple[Origin, str]:
    """The origin to connect to and the request target; ValueError for anything but an absolute http(s) URL."""
    parts = urlsplit(url)
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"not an absolute http or https URL: {url!r}")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Origin(parts.scheme, parts.hostname, parts.port or _DEFAULT_PORTS[parts.scheme]), target


@dataclass(eq=False)
class _Connection:
    stream: trio.SocketStream | trio.SSLStream
    protocol: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))
    idle_since: float = 0.0

    def socket(self) -> trio.socket.SocketType:
        stream = self.stream
        return stream.transport_stream.socket if isinstance(stream, trio.SSLStream) else stream.socket

    def can_be_reused(self, now: float) -> bool:
        """An idle connection that turned readable was closed by the server (or sent junk): never write into it."""
        return now - self.idle_since < IDLE_EXPIRY_S and not self.socket().is_readable()

    async def exchange(self, request: bytes) -> HttpAnswer:
        response = await self.send_and_read_head(request)
        body = bytearray()
        while not isinstance(event := await self._next_event(), h11.EndOfMessage):
            if not isinstance(event, h11.Data):
                raise NoAnswer(CLOSED_BEFORE_ANSWER)
            body += event.data
            if len(body) > MAX_RESPONSE_BYTES:
                raise NoAnswer(f"answer over {MAX_RESPONSE_BYTES} bytes")
        return HttpAnswer(response.status_code, bytes(body))

    async def send_and_read_head(self, request: bytes) -> h11.Response:
        """Write the request and read the answer's head, past any 1xx; NoAnswer when none comes."""
        await self.stream.send_all(request)
        response = await self._next_event()
        while isinstance(response, h11.InformationalResponse):
            response = await self._next_event()
        if not isinstance(response, h11.Response):
            raise NoAnswer(CLOSED_BEFORE_ANSWER)
        return response

    def finish_cycle(self, now: float) -> bool:
        """Ready the connection for its next request; False when either side asked to close it, or when
        bytes came after the answer (they would be taken for the next request's answer)."""
        if self.protocol.our_state is not h11.DONE or self.protocol.their_state is not h11.DONE:
            return False
        if any(self.protocol.trailing_data):
            return False
        self.protocol.start_next_cycle()
        self.idle_since = now
        return True

    async def _next_event(self) -> object:
        closed_by_server = False
        while True:
            try:
                event = self.protocol.next_event()
            except h11.RemoteProtocolError as error:
                if closed_by_server:
                    raise NoAnswer(CLOSED_BEFORE_ANSWER) from None
                raise NoAnswer(f"the server's answer is not valid HTTP/1.1: {error}") from None
            if event is not h11.NEED_DATA:
                return event
            data = await self.stream.receive_some(RECEIVE_SIZE)
            closed_by_server = not data
            self.protocol.receive_data(data)


class HttpClient:
    """Use as `async with HttpClient(...) as client`; idle connections are closed on the way out."""

    def __init__(self, *, max_connections: int, timeout_s: float, connect_timeout_s: float | None = None,
                 pool_timeout_s: float | None = None, ssl_context: ssl.SSLContext | None = None,
                 proxies: Mapping[str, str] | None = None) -> None:
        """`timeout_s` bounds each exchange once written; connecting and waiting for a free connection
        have their own bounds, no longer than it. `proxies` is a urllib-style map (see https_proxy_for)."""
        self._slots = trio.Semaphore(max_connections)
        self._timeout_s = timeout_s
        self._connect_timeout_s = min(timeout_s, connect_timeout_s or timeout_s)
        self._pool_timeout_s = min(timeout_s, pool_timeout_s or timeout_s)
        self._ssl_context = ssl_context or ssl.create_default_context()
        self._proxies = dict(proxies or {})
        if self._proxies.get("https"):
            Proxy.from_url(self._proxies["https"])  # a bad proxy URL fails here, before any request is taken on
        self._idle: dict[Origin, list[_Connection]] = {}
        self.connections_opened = 0

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for connections in self._idle.values():
            for connection in connections:
                await trio.aclose_forcefully(connection.stream)
        self._idle.clear()

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> HttpAnswer:
        return await self.request("POST", url, body, headers)

    async def request(self, method: str, url: str, body: bytes, headers: dict[str, str]) -> HttpAnswer:
        """One exchange. Raises RequestNotSent or NoAnswer; ValueError for a URL or header it cannot send."""
        origin, request_head = request_head_for(method, url, len(body), headers)
        with trio.move_on_after(self._pool_timeout_s) as waiting:
            await self._slots.acquire()
        if waiting.cancelled_caught:
            raise RequestNotSent(f"no free connection within {self._pool_timeout_s:g} s")
        try:
            connection = await self._connection_to(origin)
            try:
                with trio.fail_after(self._timeout_s):
                    answer = await connection.exchange(
                        connection.protocol.send(request_head) + connection.protocol.send(h11.Data(data=body))
                        + connection.protocol.send(h11.EndOfMessage()))
            except BaseException as error:
                await trio.aclose_forcefully(connection.stream)  # whatever went wrong, it is in no known state
                if isinstance(error, trio.TooSlowError):
                    raise NoAnswer(f"no answer within {self._timeout_s:g} s") from None
                if isinstance(error, _TRANSPORT_ERRORS):
                    raise NoAnswer(f"connection failed after the request was written: {error!r}") from None
                raise
            if connection.finish_cycle(trio.current_time()):
                self._idle.setdefault(origin, []).append(connection)
            else:
                await trio.aclose_forcefully(connection.stream)
            return answer
        finally:
            self._slots.release()

    async def _connection_to(self, origin: Origin) -> _Connection:
        """A kept-alive connection to `origin` still good to write into, or a new one."""
        idle = self._idle.get(origin, [])
        now = trio.current_time()
        while idle:
            connection = idle.pop()  # the most recently used is the least likely to have been closed
            if connection.can_be_reused(now):
                return connection
            await trio.aclose_forcefully(connection.stream)
        proxy = https_proxy_for(origin, self._proxies)
        where = f"{origin.host}:{origin.port}" + (f" through the proxy {proxy.host}:{proxy.port}" if proxy else "")
        try:
            with trio.fail_after(self._connect_timeout_s):
                stream = await self._open(origin, proxy)
        except trio.TooSlowError:
            raise RequestNotSent(f"no connection to {where} within {self._connect_timeout_s:g} s") from None
        except _TRANSPORT_ERRORS as error:
            reason = error.__cause__ or error  # a failed TLS handshake says why in the SSLError beneath
            raise RequestNotSent(f"cannot connect to {where}: {reason}") from None
        self.connections_opened += 1
        return _Connection(stream)

    async def _open(self, origin: Origin, proxy: Proxy | None) -> trio.SocketStream | trio.SSLStream:
        if proxy is None:
            stream = await trio.open_tcp_stream(origin.host, origin.port)
        else:
            stream = await _open_tunnel(proxy, origin)
        if origin.scheme == "http":
            return stream
        tls_stream = trio.SSLStream(stream, self._ssl_context, server_hostname=origin.host, https_compatible=True)
        try:
            await tls_stream.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return tls_stream


async def _open_tunnel(proxy: Proxy, origin: Origin) -> trio.SocketStream:
    """A TCP stream to `origin` through the proxy's CONNECT; RequestNotSent when the proxy refuses it."""
    stream = await trio.open_tcp_stream(proxy.host, proxy.port)
    try:
        tunnel = _Connection(stream)
        authority = f"{origin.host}:{origin.port}"
        headers = [("Host", authority)] + ([("Proxy-Authorization", proxy.authorization)] if proxy.authorization else [])
        refusal = f"the proxy {proxy.host}:{proxy.port} refused a tunnel to {authority}"
        try:
            response = await tunnel.send_and_read_head(
                tunnel.protocol.send(h11.Request(method="CONNECT", target=authority, headers=headers))
                + tunnel.protocol.send(h11.EndOfMessage()))
        except NoAnswer as error:
            raise RequestNotSent(f"{refusal}: {error}") from None
        if not 200 <= response.status_code < 300:
            raise RequestNotSent(f"{refusal}: HTTP {response.status_code}")
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream
