"""The traffic port's HTTP/1.1 server: one protocol class of our own on httptools'
public parser API (``httptools.HttpRequestParser`` and its callbacks).

Parsing stays in llhttp; this module owns everything else about a client connection,
in one place: framing of responses (a whole body with its length, or a chunked
stream), keep-alive, pipelining order (requests on one connection are handled one
at a time, answered in order), flow control in both directions (reading pauses while
requests wait behind the one being handled; a writer awaits ``Response.drain`` while
the client's unsent bytes are above the transport's high-water mark) and the limits
a hostile client meets (request line, header bytes and count, body size, header and
body read timeouts, idle keep-alive timeout, a cap on open connections).

A request is handed to the handler only once whole (head and body): the proxy needs
the whole body to check it, and no handler ever waits on a slow client's upload.
One connection has at most one timer; its phase (idle, head, body) says what it
guards, and moving to a later deadline costs no timer call.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Protocol

import httptools

from sentinel.logs import get_logger
from sentinel.net import local_url
from sentinel.proxy.errors import error_body

log = get_logger(__name__)

WRITE_HIGH_WATER = 64 * 1024
LINGER_S = 2.0  # after a refusal: the client's further bytes are dropped this long
MAX_PIPELINED = 16  # whole requests waiting behind the one being handled, then reading pauses


@dataclass(frozen=True, slots=True)
class HttpLimits:
    max_request_line_bytes: int = 8192
    max_header_bytes: int = 32768
    max_headers: int = 100
    max_body_bytes: int = 4 * 1024 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keepalive_timeout_s: float = 75.0
    max_connections: int = 2048


class Request:
    """One whole client request. ``target`` is the raw request target (path and query)
    as sent; header names are lower-case bytes."""

    __slots__ = ("method", "target", "headers", "body", "keep_alive", "version", "_parts", "_size")

    def __init__(self) -> None:
        self.method = ""
        self.target = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.keep_alive = True
        self.version = "1.1"
        self._parts: list[bytes] = []
        self._size = 0


class _Refusal:
    """A request the connection refuses itself (bad framing, a limit, a timeout):
    answered in its turn, then the connection closes."""

    __slots__ = ("status", "code", "message")

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status = status
        self.code = code
        self.message = message


class _Refused(Exception):
    def __init__(self, refusal: _Refusal) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal


Handler = Callable[[Request, "Response"], Awaitable[None]]


def _status_line(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return b"HTTP/1.1 %d %s\r\n" % (status, phrase.encode())


_STATUS_LINES = {s.value: _status_line(s.value) for s in HTTPStatus}


class Response:
    """The one response to one request, written onto its connection: ``whole`` (a body
    of known length, head and body in one write) or ``start`` / ``write`` / ``end``
    (a stream, chunked for HTTP/1.1 clients; for HTTP/1.0 the body runs to the close).
    A writer of a stream awaits ``drain`` when ``paused`` (the client is behind)."""

    __slots__ = ("_conn", "_keep_alive", "_chunked", "started", "ended", "gone")

    def __init__(self, conn: HttpConnection, req: Request) -> None:
        self._conn = conn
        # a HEAD request's answer is closed after (its body would be read as the next)
        self._keep_alive = req.keep_alive and req.method != "HEAD"
        self._chunked = req.version == "1.1"
        self.started = False
        self.ended = False
        self.gone = False  # the client went away before the response ended

    def _head(self, status: int, headers: list[tuple[bytes, bytes]], framing: bytes) -> bytes:
        line = _STATUS_LINES.get(status) or _status_line(status)
        parts = [line]
        for k, v in headers:
            parts.append(k + b": " + v + b"\r\n")
        parts.append(framing)
        if not self._keep_alive or self._conn.closing:
            self._keep_alive = False
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def whole(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        if self.started:
            raise RuntimeError("response already started")
        self.started = self.ended = True
        head = self._head(status, headers, b"content-length: %d\r\n" % len(body))
        self._conn.write(head + body)

    def start(self, status: int, headers: list[tuple[bytes, bytes]], first: bytes) -> None:
        if self.started:
            raise RuntimeError("response already started")
        self.started = True
        if self._chunked:
            head = self._head(status, headers, b"transfer-encoding: chunked\r\n")
            if first:
                head += b"%x\r\n%b\r\n" % (len(first), first)
            self._conn.write(head)
        else:
            self._keep_alive = False  # an HTTP/1.0 body without length ends with the close
            self._conn.write(self._head(status, headers, b"") + first)

    def write(self, data: bytes) -> None:
        if data:
            self._conn.write(b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data)

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            if self._chunked:
                self._conn.write(b"0\r\n\r\n")

    @property
    def paused(self) -> bool:
        return self._conn.write_paused

    async def drain(self) -> None:
        await self._conn.drain()


class HttpConnection(asyncio.Protocol):
    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.limits = server.limits
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.closing = False  # no new request is read; close after the current answers
        self.write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._req: Request | None = None  # the request being read
        self._url_size = 0
        self._head_size = 0
        self._in_head = True
        self._queue: deque[Request | _Refusal] = deque()
        self._queued_bytes = 0
        self._read_paused = False
        self._active: asyncio.Task[None] | None = None
        self._active_resp: Response | None = None
        self._counted = False
        self._continue_due = False
        self._next_due = False  # the next request waits for the client to read
        # the one timer: phase None / "idle" / "head" / "body", and its deadline
        self._phase: str | None = None
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    # ---- the connection ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # (uvloop's is no subclass)
        server = self.server
        if len(server.connections) >= self.limits.max_connections:
            server.events.connection_refused()
            self.closing = True
            transport.abort()
            return
        self._counted = True
        server.connections.add(self)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self._arm("idle", self.limits.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self._counted:
            self._counted = False
            self.server.connections.discard(self)
        self._phase = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._queue.clear()
        task = self._active
        if task is not None and not task.done():
            if self._active_resp is not None and not self._active_resp.ended:
                self._active_resp.gone = True
                task.cancel()
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)
        if self._next_due:  # answers had piled up unread: the next request may go now
            self._next_due = False
            self._next()

    async def drain(self) -> None:
        if not self.write_paused or self.transport is None or self.transport.is_closing():
            return
        if self._drain_waiter is None:
            self._drain_waiter = self.loop.create_future()
        await self._drain_waiter

    def write(self, data: bytes) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(data)

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    # ---- reading ----------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        max_head = self.limits.max_request_line_bytes + self.limits.max_header_bytes
        while data:
            part = data
            if self._in_head:
                # never hand llhttp more head than the limits allow: bytes beyond them
                # are refused unread (httptools would gather them all in memory)
                room = max_head - self._head_size
                if len(data) > room:
                    part, data = data[:room], data[room:]
                else:
                    data = b""
                self._head_size += len(part)
            else:
                data = b""
            try:
                self.parser.feed_data(part)
            except httptools.HttpParserUpgrade:
                # an Upgrade (h2c, websocket) is not offered: the request is answered
                # as HTTP/1.1, and the connection closes after it
                self._stop_reading()
                return
            except httptools.HttpParserCallbackError as exc:
                cause = exc.__context__
                if isinstance(cause, _Refused):
                    self._refuse(cause.refusal)
                else:
                    log.error("proxy_parser_callback_failed", exc_info=cause)
                    self._refuse(_Refusal(500, "internal_error", "internal error"))
                return
            except httptools.HttpParserError as exc:
                self._refuse(_Refusal(400, "bad_request", f"Malformed HTTP request: {exc}"))
                return
            if self._in_head and self._head_size >= max_head:
                self._refuse(
                    _Refusal(
                        431,
                        "header_too_large",
                        "Request headers are larger than "
                        f"{self.limits.max_header_bytes} bytes (proxy.limits.max_header_bytes)",
                    )
                )
                return

    def eof_received(self) -> bool | None:
        return None  # a half-closed client is a gone client: the transport closes

    def on_message_begin(self) -> None:
        self._req = Request()
        self._url_size = 0
        self._arm("head", self.limits.header_timeout_s)

    def on_url(self, url: bytes) -> None:
        req = self._req
        assert req is not None
        self._url_size += len(url)
        if self._url_size > self.limits.max_request_line_bytes:
            raise _Refused(
                _Refusal(
                    414,
                    "uri_too_long",
                    "Request target is longer than "
                    f"{self.limits.max_request_line_bytes} bytes "
                    "(proxy.limits.max_request_line_bytes)",
                )
            )
        req._parts.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self._req
        assert req is not None
        if len(req.headers) >= self.limits.max_headers:
            raise _Refused(
                _Refusal(
                    431,
                    "too_many_headers",
                    f"More than {self.limits.max_headers} request headers "
                    "(proxy.limits.max_headers)",
                )
            )
        req.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        req = self._req
        assert req is not None
        parser = self.parser
        req.target = b"".join(req._parts)
        req._parts = []
        req.method = parser.get_method().decode("ascii", "replace")
        req.version = parser.get_http_version()
        req.keep_alive = parser.should_keep_alive()
        self._in_head = False
        limit = self.limits.max_body_bytes
        expect = False
        for k, v in req.headers:
            if k == b"content-length":
                if v.isdigit() and int(v) > limit:
                    raise _Refused(_too_large(int(v), limit))
            elif k == b"expect" and v.lower() == b"100-continue":
                expect = True
        self._continue_due = expect
        if expect and self._active is None and not self._queue:
            self._send_continue()
        self._arm("body", self.limits.body_timeout_s)

    def _send_continue(self) -> None:
        self._continue_due = False
        self.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        req = self._req
        assert req is not None
        req._size += len(body)
        if req._size > self.limits.max_body_bytes:
            raise _Refused(_too_large(req._size, self.limits.max_body_bytes))
        req._parts.append(body)

    def on_message_complete(self) -> None:
        req = self._req
        assert req is not None
        self._req = None
        parts = req._parts
        req.body = parts[0] if len(parts) == 1 else b"".join(parts)
        req._parts = []
        self._in_head = True
        self._head_size = 0
        self._phase = None
        self._queue.append(req)
        self._queued_bytes += req._size
        if self._active is None:
            self._next()
        if len(self._queue) >= MAX_PIPELINED or self._queued_bytes > self.limits.max_body_bytes:
            self._pause_reading()

    def _pause_reading(self) -> None:
        if not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()

    def _stop_reading(self) -> None:
        self.closing = True
        self._phase = None
        self._pause_reading()
        if self._active is None:
            self._next()

    def _refuse(self, refusal: _Refusal) -> None:
        self.server.events.client_refused(refusal.code)
        self._req = None
        self._queue.append(refusal)
        self._stop_reading()

    # ---- handling, one request at a time ------------------------------------------
    def _next(self) -> None:
        """Start the next waiting request, or go idle (or close)."""
        self._active = None
        self._active_resp = None
        if self.transport is None or self.transport.is_closing():
            return
        if self._queue and self.write_paused:
            # a client that pipelines and does not read: no new answer is made while
            # the ones before wait unsent (reading stops once the queue is full)
            self._next_due = True
            return
        if not self._queue:
            if self.closing:
                self.close()
            elif self._req is None:
                self._arm("idle", self.limits.keepalive_timeout_s)
            elif self._continue_due:  # its turn has come: the client may send the body
                self._send_continue()
            return
        item = self._queue.popleft()
        if isinstance(item, _Refusal):
            self._answer_refusal(item)
            return
        self._queued_bytes -= item._size
        if self._read_paused and not self.closing and len(self._queue) < MAX_PIPELINED // 2:
            self._read_paused = False
            self.transport.resume_reading()
        resp = Response(self, item)
        self._active_resp = resp
        task = self.loop.create_task(self.server.handler(item, resp))
        self._active = task
        task.add_done_callback(self._handled)

    def _handled(self, task: asyncio.Task[None]) -> None:
        resp = self._active_resp
        if task.cancelled():
            exc: BaseException | None = None
        else:
            exc = task.exception()
        if exc is not None:
            log.error("proxy_request_failed", error=f"{type(exc).__name__}: {exc}", exc_info=exc)
        if resp is not None and not resp.ended:
            if not resp.started and not resp.gone:
                body = error_body(500, "internal error in Sentinel's proxy", "internal_error")
                resp._keep_alive = False
                resp.whole(500, [(b"content-type", b"application/json")], body)
            self.close()  # a response cut short: the close tells the client
            self._active = None
            self._active_resp = None
            return
        if resp is not None and not resp._keep_alive:
            # the answer ends the connection (asked for, HTTP/1.0, or a body that runs
            # to the close): nothing more is written, requests read behind it are dropped
            self._queue.clear()
            self.close()
            self._active = None
            self._active_resp = None
            return
        self._next()

    def _answer_refusal(self, refusal: _Refusal) -> None:
        body = error_body(refusal.status, refusal.message, refusal.code)
        head = _STATUS_LINES.get(refusal.status) or _status_line(refusal.status)
        rid = self.server.new_request_id().encode()
        self.write(
            head + b"content-type: application/json\r\ncontent-length: %d\r\n"
            b"x-request-id: %b\r\nconnection: close\r\n\r\n" % (len(body), rid) + body
        )
        self._linger()

    def _linger(self) -> None:
        """Close after an answer the client may still be sending into (a refused body
        or header): our side is shut for writing and what still arrives is read and
        dropped for a moment, so that the client reads the answer instead of a reset."""
        t = self.transport
        if t is None or t.is_closing():
            return
        if not t.can_write_eof():
            t.close()
            return
        t.write_eof()
        self.closing = True
        if self._read_paused:
            self._read_paused = False
            t.resume_reading()
        self._arm("linger", LINGER_S)

    # ---- the timer --------------------------------------------------------------------
    def _arm(self, phase: str, timeout: float) -> None:
        self._phase = phase
        deadline = self.loop.time() + timeout
        self._deadline = deadline
        timer = self._timer
        if timer is None or deadline < self._timer_at:
            if timer is not None:
                timer.cancel()
            self._timer_at = deadline
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        phase = self._phase
        if phase is None or (self.closing and phase != "linger"):
            return
        if self.loop.time() < self._deadline:
            self._timer_at = self._deadline
            self._timer = self.loop.call_at(self._deadline, self._on_timer)
            return
        self._phase = None
        if phase == "linger":
            if self.transport is not None:
                self.transport.abort()
        elif phase == "idle":
            self.server.events.client_refused("idle_timeout")
            self.close()
        elif phase == "head":
            self._refuse(
                _Refusal(
                    408,
                    "header_timeout",
                    "Request headers not received within "
                    f"{self.limits.header_timeout_s:g} s (proxy.limits.header_timeout_s)",
                )
            )
        else:
            self._refuse(
                _Refusal(
                    408,
                    "body_timeout",
                    "Request body not received within "
                    f"{self.limits.body_timeout_s:g} s (proxy.limits.body_timeout_s)",
                )
            )


def _too_large(size: int, limit: int) -> _Refusal:
    return _Refusal(
        413,
        "body_too_large",
        f"Request body is {size} bytes, over the limit of {limit} (proxy.max_body_bytes)",
    )


class ServerEvents(Protocol):
    """What the server counts (the proxy's metrics implement it)."""

    def connection_refused(self) -> None:
        """A connection beyond ``max_connections``, closed at once."""

    def client_refused(self, reason: str) -> None:
        """A request refused by the connection itself (a limit, a timeout, bad framing)."""


class _Uncounted:
    def connection_refused(self) -> None:
        pass

    def client_refused(self, reason: str) -> None:
        pass


def _counter_ids() -> Callable[[], str]:
    n = itertools.count(1)
    return lambda: f"conn-{next(n):010x}"


class ProxyBindError(RuntimeError):
    pass


def bind(host: str, port: int, backlog: int = 2048) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say so (else
    # Nagle + delayed ACK add ~40 ms to every response written in two parts)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ProxyBindError(
            f"proxy cannot listen on {host}:{port} (proxy.host/proxy.port): {exc.strerror}"
        ) from None
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


class HttpServer:
    """The listening socket (bound at construction, so port 0 works and a port in use
    is reported before anything starts) and its connections."""

    def __init__(
        self,
        handler: Handler,
        host: str,
        port: int,
        limits: HttpLimits,
        events: ServerEvents | None = None,
        backlog: int = 2048,
        new_request_id: Callable[[], str] | None = None,
    ) -> None:
        self.handler = handler
        self.new_request_id = new_request_id or _counter_ids()
        self.host = host
        self.limits = limits
        self.events: ServerEvents = events if events is not None else _Uncounted()
        self.backlog = backlog
        self.sock = bind(host, port, backlog)
        self.port: int = self.sock.getsockname()[1]
        self.connections: set[HttpConnection] = set()
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by serve
        self.started = False
        self._stop: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return local_url(self.host, self.port)

    async def serve(self, grace_s: float = 5.0) -> None:
        """Serve until ``request_stop`` (then requests in flight get ``grace_s`` to end)
        or cancellation (connections are aborted at once)."""
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await self.loop.create_server(
            lambda: HttpConnection(self), sock=self.sock, backlog=self.backlog
        )
        log.info("proxy_listening", host=self.host, port=self.port)
        self.started = True
        try:
            await self._stop.wait()
            server.close()
            for conn in list(self.connections):
                conn.closing = True
                if conn._active is None:
                    conn.close()
            async with asyncio.timeout(grace_s):
                while self.connections:
                    await asyncio.sleep(0.05)
        except TimeoutError:
            pass
        finally:
            server.close()
            for conn in list(self.connections):
                if conn.transport is not None:
                    conn.transport.abort()
            self.sock.close()

    def request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def wait_started(self, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not self.started:
                await asyncio.sleep(0.01)
