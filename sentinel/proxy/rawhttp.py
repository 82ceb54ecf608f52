"""A lean HTTP/1.1 upstream client: asyncio protocols, the httptools parser, a keep-alive
pool per upstream. Chosen over aiohttp/httpx because it costs a fraction of their
per-request CPU (see bench/proxy.py): the proxy's added latency is mostly this client.

- Connections are reused LIFO and dropped once idle for ``idle_s`` (below the common
  5 s server keep-alive), or when the upstream answered ``Connection: close``.
- A reused connection that dies before any response byte is retried once on a fresh
  connection (the server closed it while idle); any other failure is the caller's.
- Body bytes are handed on as they arrive, one item per network read; reading pauses
  when more than ``HIGH_WATER`` bytes wait for a slow consumer (back-pressure).
- ``abort`` closes the connection, which makes the upstream cancel the request.
- ``relay_inline(sink)`` hands each later body part to ``sink`` inside the network
  read that brought it (no task wake-up per part, so a stream's events cost the event
  loop one callback each); when the sink refuses a part (its client is slow), the part
  is queued and the caller reads the rest as usual, with back-pressure.
- ``start(request)`` writes a request on an idle pooled connection at once, outside
  any task, and returns its response (None: no idle connection; ``send`` then). Such a
  response may carry an ``early`` hook that sees its body parts, and its end, before
  they are queued, inside the network read; ``resume`` waits for its head (and takes
  a fresh connection, once, when the idle one turns out dead), and ``decided``
  resolves once the hook has let go. With these the proxy answers its client from
  the upstream's read, without waiting for its request task's turn on the loop.
  While the hook holds a response that nobody else waits on, ``on_lost`` tells it of
  a failure or of a part its sink refused, and ``on_end`` of the body's end.
- Interim answers (``100 Continue``, ``102 Processing``, ``103 Early Hints``) are
  skipped: only a final status is the answer. Bytes that no request asked for (after
  a complete answer, or on an idle connection) close the connection: it is never
  pooled with unread bytes, so no request is handed another's answer.
- A connection reset before a body delimited by the close has ended is a failure; a
  clean close ends such a body.
- The connect deadline is judged on the socket, not on the event loop's timers: when
  it passes while Sentinel's own loop was stalled, a connection the kernel completed
  in time is used (see ``_Pool.connect``).
- An exception raised by our own parser callbacks is a bug of ours, reported as
  ``internal_error`` (not a health failure of the upstream), never as a malformed
  upstream response.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import cast
from urllib.parse import urlsplit

import httptools

from sentinel.logs import get_logger
from sentinel.proxy.upstream import UpstreamError, UpstreamRequest

log = get_logger(__name__)

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024


class _Conn(asyncio.Protocol):
    __slots__ = (
        "pool",
        "transport",
        "parser",
        "resp",
        "closed",
        "idle_since",
        "paused",
        "interim",
        "stray",
    )

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.resp: RawResponse | None = None
        self.closed = False
        self.idle_since = 0.0
        self.paused = False
        self.interim = False  # parsing a 1xx answer (skipped)
        self.stray = False  # bytes came that no request asked for

    # ---- asyncio.Protocol ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's do not subclass asyncio.Transport)
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            # one of our callbacks raised: a bug of ours, not the upstream's fault
            log.error("upstream_parser_bug", error=repr(exc.__context__), exc_info=exc)
            self._fail(UpstreamError("internal_error", f"proxy error: {exc.__context__!r}", False))
            self.close()
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("reset", "malformed upstream response: unexpected upgrade"))
            self.close()
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError("reset", f"malformed upstream response: {exc}"))
            self.close()
        if self.stray:
            self._fail(UpstreamError("reset", "malformed upstream response: unsolicited bytes"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        resp = self.resp
        if resp is not None and not resp.done:
            if (
                exc is None
                and resp.got_headers
                and resp.content_length is None
                and not resp.chunked
            ):
                resp.finish()  # a body delimited by the connection's (clean) close ends here
                self.resp = None
                return
            detail = f"upstream closed the connection ({exc or 'EOF'})"
            self._fail(UpstreamError("reset", detail))

    # ---- httptools callbacks --------------------------------------------------------
    def on_message_begin(self) -> None:
        resp = self.resp
        if resp is None or resp.done:
            self.stray = True  # an answer nobody asked for: this connection is spoiled

    def on_header(self, name: bytes, value: bytes) -> None:
        resp = self.resp
        if resp is not None and not self.stray:
            resp.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        resp = self.resp
        if resp is None or self.stray:
            return
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # an interim answer (100, 102, 103): not the answer
            resp.headers.clear()
            self.interim = True
            return
        resp.status = status
        for k, v in resp.headers:
            if k == b"content-length":
                resp.content_length = int(v)
            elif k == b"content-type":
                resp.content_type = v.decode("latin-1")
            elif k == b"transfer-encoding" and b"chunked" in v.lower():
                resp.chunked = True
        resp.got_headers = True
        if not resp.head_fut.done():
            resp.head_fut.set_result(None)
        if resp.method == "HEAD":
            resp.finish()
            self.resp = None
            self.close()

    def on_body(self, body: bytes) -> None:
        resp = self.resp
        if resp is not None and not self.stray:
            sink = resp._sink  # a stream's part, on the path of every event: no more frames
            if sink is None or resp.early is not None:
                resp.feed(body)
            elif not sink(body):
                resp.refused(body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        resp = self.resp
        if resp is None or self.stray:
            return
        keep = self.parser.should_keep_alive()
        self.resp = None
        resp.finish()
        if keep and not self.closed:
            self.pool.put(self)
        else:
            self.close()

    # ---- helpers ----------------------------------------------------------------------
    def _fail(self, err: UpstreamError) -> None:
        resp = self.resp
        self.resp = None
        if resp is not None:
            resp.fail(err)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        self.resp = None
        if self.transport is not None:
            self.transport.abort()

    def pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()


class RawResponse:
    __slots__ = (
        "conn",
        "method",
        "status",
        "headers",
        "content_length",
        "content_type",
        "head_fut",
        "got_headers",
        "chunked",
        "done",
        "error",
        "_chunks",
        "_buffered",
        "_waiter",
        "_sink",
        "request",
        "early",
        "decided",
        "committed",
        "on_lost",
        "on_end",
    )

    def __init__(self, conn: _Conn, method: str, loop: asyncio.AbstractEventLoop) -> None:
        self.conn = conn
        self.method = method
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_length: int | None = None
        self.content_type = ""
        self.head_fut: asyncio.Future[None] = loop.create_future()
        self.got_headers = False
        self.chunked = False
        self.done = False
        self.error: UpstreamError | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._sink: Callable[[bytes], bool] | None = None
        self.request: UpstreamRequest | None = None  # for ``start``ed ones: to send again
        # the early hook: ``early(part, False)`` for each body part, ``early(b"", True)``
        # at the end, until it sets ``early`` to None; True: it took the part
        self.early: Callable[[bytes, bool], bool] | None = None
        self.decided: asyncio.Future[None] | None = None  # resolves when early lets go
        self.committed = False  # the early hook answered the client with this response
        # set while the early hook holds the response and nobody else waits on it:
        # ``on_lost`` is called when it fails (the connection reset or closed, a
        # malformed answer) or when the sink refuses a part (it is queued), so that
        # someone takes over; ``on_end`` when the body ended with every part taken
        self.on_lost: Callable[[], None] | None = None
        self.on_end: Callable[[], None] | None = None

    # ---- fed by the connection ------------------------------------------------------
    def feed(self, data: bytes) -> None:
        early = self.early
        if early is not None:
            took = early(data, False)
            if self.early is None:
                self._decide()
            if took:
                return
        sink = self._sink
        if sink is None:
            self._queue(data)
        elif not sink(data):
            self.refused(data)

    def refused(self, data: bytes) -> None:
        """A part the sink refused (a slow client): queued, and the rest read the usual
        way, with back-pressure; ``on_lost`` is told, so that someone reads it."""
        self._sink = None
        self._queue(data)
        if self.on_lost is not None:
            self.on_lost()

    def _queue(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER:
            self.conn.pause()
        self._wake()

    def finish(self) -> None:
        early = self.early
        if early is not None:
            early(b"", True)
            self.early = None
            self._decide()
        self.done = True
        self._wake()
        end = self.on_end
        if end is not None:
            end()

    def fail(self, err: UpstreamError) -> None:
        self.error = err
        self.done = True
        self.early = None
        self._decide()
        if not self.head_fut.done():
            self.head_fut.set_exception(err)
        self._wake()
        if self.on_lost is not None:
            self.on_lost()

    def requeue(self, parts: list[bytes]) -> None:
        """Body parts the early hook took and gives back (it did not answer with them)."""
        for data in parts:
            self._chunks.append(data)
            self._buffered += len(data)

    def _decide(self) -> None:
        d = self.decided
        if d is not None and not d.done():
            d.set_result(None)

    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    # ---- consumer side (UpstreamResponse) ---------------------------------------------
    async def _next(self) -> bytes | None:
        while True:
            if self._chunks:
                data = self._chunks.popleft()
                self._buffered -= len(data)
                if self._buffered < LOW_WATER:
                    self.conn.resume()
                return data
            if self.error is not None:
                raise self.error
            if self.done:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter

    def pipe(self, sink: Callable[[bytes], bool]) -> None:
        """From the next part on, hand each body part to ``sink`` as it arrives (see
        ``relay_inline``, which waits for the end)."""
        self._sink = sink

    async def relay_inline(self, sink: Callable[[bytes], bool]) -> None:
        """Give every body part to ``sink`` as it arrives, in order, until the body
        ends, fails, or ``sink`` returns False for a part (it then stays queued). Then
        return: iterate over this response for whatever is left (nothing once done;
        the error, if one came)."""
        chunks = self._chunks
        while chunks:  # what arrived before, first
            data = chunks[0]
            if not sink(data):
                return
            chunks.popleft()
            self._buffered -= len(data)
        self.conn.resume()
        if self.done:
            return
        self._sink = sink
        try:
            while self._sink is not None and not self.done:
                self._waiter = asyncio.get_running_loop().create_future()
                await self._waiter
        finally:
            self._sink = None

    async def read(self) -> bytes:
        parts = []
        while (data := await self._next()) is not None:
            parts.append(data)
        return b"".join(parts)

    def chunks(self) -> RawResponse:
        return self

    def __aiter__(self) -> RawResponse:
        return self

    async def __anext__(self) -> bytes:
        data = await self._next()
        if data is None:
            raise StopAsyncIteration
        return data

    def release(self) -> None:
        pass  # the connection went back to the pool when the message completed

    def abort(self) -> None:
        self.early = None
        self._decide()
        if not self.done:
            self.done = True
            self.conn.abort()


class _Pool:
    def __init__(
        self, host: str, port: int, tls: ssl.SSLContext | None, max_idle: int, idle_s: float
    ) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.max_idle = max_idle
        self.idle_s = idle_s
        self.idle: list[_Conn] = []
        self.addr: tuple[int, tuple[object, ...]] | None = None  # an IP literal's address
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            v6 = ip.version == 6
            self.addr = (socket.AF_INET6 if v6 else socket.AF_INET, (host, port))
        host_hdr = host if ":" not in host else f"[{host}]"
        default = 443 if tls else 80
        self.host_header = (host_hdr if port == default else f"{host_hdr}:{port}").encode()

    def put(self, conn: _Conn) -> None:
        if len(self.idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self.idle.append(conn)

    def get(self) -> _Conn | None:
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()
            if conn.closed or conn.transport is None or conn.transport.is_closing():
                continue
            if now - conn.idle_since > self.idle_s:
                conn.close()
                continue
            return conn
        return None

    async def _address(self, timeout: float) -> tuple[int, tuple[object, ...]]:
        """The address family and socket address to connect to (an IP literal is not
        resolved; a name is, within ``timeout``)."""
        if self.addr is not None:
            return self.addr
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except TimeoutError:
            raise UpstreamError("connect_timeout", f"resolving {self.host} timed out") from None
        except OSError as exc:
            raise UpstreamError(
                "connect_error", f"cannot resolve {self.host}: {exc.strerror or exc}"
            ) from None
        if not infos:
            raise UpstreamError("connect_error", f"cannot resolve {self.host}")
        return infos[0][0], infos[0][4]

    async def connect(self, timeout: float) -> _Conn:
        """A new connection. The deadline is judged on the socket: when it passes (its
        timer may fire late, after a stall of Sentinel's own loop, and under uvloop
        before the loop has looked at the socket), a connection the kernel completed
        counts; only one still in progress is a ``connect_timeout``."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        family, addr = await self._address(timeout)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await _connect(sock, addr, started + timeout)
            _, conn = await loop.create_connection(
                lambda: _Conn(self),
                sock=sock,
                ssl=self.tls,
                server_hostname=self.host if self.tls else None,
            )
        except OSError as exc:
            sock.close()
            raise UpstreamError(
                "connect_error", f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}"
            ) from None
        except BaseException:
            sock.close()
            raise
        return conn

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


async def _connect(sock: socket.socket, addr: tuple[object, ...], deadline: float) -> None:
    """Connect the non-blocking ``sock`` by ``deadline`` (loop time). The connect is
    issued at once; when the deadline passes, the socket says whether it completed
    (a stalled loop may not have looked at it yet). Raises ``OSError`` (refused,
    unreachable) or ``UpstreamError`` (connect_timeout)."""
    err = sock.connect_ex(addr)
    if err in (errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK):
        loop = asyncio.get_running_loop()
        writable = loop.create_future()
        fd = sock.fileno()
        loop.add_writer(fd, _set_done, writable)
        try:
            async with asyncio.timeout_at(deadline):
                await writable
        except TimeoutError:
            pass  # judged on the socket below
        finally:
            loop.remove_writer(fd)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err == 0:
            try:
                sock.getpeername()
            except OSError:  # still in progress: the upstream did not accept in time
                host, port = addr[0], addr[1]
                raise UpstreamError(
                    "connect_timeout", f"connect to {host}:{port} timed out"
                ) from None
    if err != 0:
        raise OSError(err, os.strerror(err))


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class RawTransport:
    """``Transport`` over ``_Pool``s, one per scheme/host/port seen."""

    def __init__(self, limit: int = 64, idle_s: float = 4.0) -> None:
        self._limit = limit
        self._idle_s = idle_s
        self._pools: dict[str, tuple[_Pool, str]] = {}
        self._tls: ssl.SSLContext | None = None

    def _pool(self, base: str) -> tuple[_Pool, str]:
        got = self._pools.get(base)
        if got is None:
            u = urlsplit(base)
            if u.scheme not in ("http", "https") or not u.hostname:
                raise UpstreamError("connect_error", f"unsupported upstream URL {base!r}")
            tls = None
            if u.scheme == "https":
                if self._tls is None:
                    self._tls = ssl.create_default_context()
                tls = self._tls
            port = u.port or (443 if tls else 80)
            got = (_Pool(u.hostname, port, tls, self._limit, self._idle_s), u.path.rstrip("/"))
            self._pools[base] = got
        return got

    def _head(self, request: UpstreamRequest, pool: _Pool, prefix: str) -> bytes:
        lines = [
            f"{request.method} {prefix}{request.target} HTTP/1.1\r\n".encode("latin-1"),
            b"host: " + pool.host_header + b"\r\n",
        ]
        for k, v in request.headers.items():
            lines.append(f"{k}: {v}\r\n".encode("latin-1"))
        body = request.body
        if body or request.method in ("POST", "PUT", "PATCH"):
            lines.append(b"content-length: %d\r\n" % len(body))
        lines.append(b"\r\n")
        return b"".join(lines)

    def start(self, request: UpstreamRequest) -> RawResponse | None:
        """Write ``request`` on an idle pooled connection now; None when there is none.
        Wait for the response's head with ``resume``."""
        pool, prefix = self._pool(request.base_url)
        conn = pool.get()
        if conn is None:
            return None
        loop = asyncio.get_running_loop()
        resp = RawResponse(conn, request.method, loop)
        resp.request = request
        resp.decided = loop.create_future()
        conn.resp = resp
        assert conn.transport is not None
        head = self._head(request, pool, prefix)
        body = request.body
        conn.transport.write(head + body if body else head)
        request.sent_at = loop.time()
        return resp

    async def resume(self, resp: RawResponse) -> RawResponse:
        """The response of a ``start``ed request once its head is in. When the idle
        connection it went on was dead (no byte came back), the request goes once
        more, on a fresh connection, as ``send`` does. Cancelled, it leaves ``resp``
        to the caller, which knows whether to abort it: the early hook may already
        have answered with it, and a deadline passing just after must not cut that."""
        try:
            await resp.head_fut
        except UpstreamError:
            if resp.got_headers or resp._chunks or resp.request is None:
                raise
            resp.early = None
            return await self.send(resp.request, reuse=False)
        return resp

    async def send(self, request: UpstreamRequest, reuse: bool = True) -> RawResponse:
        pool, prefix = self._pool(request.base_url)
        body = request.body
        head = self._head(request, pool, prefix)
        loop = asyncio.get_running_loop()
        for attempt in (0, 1):
            conn = pool.get() if attempt == 0 and reuse else None
            reused = conn is not None
            if conn is None:
                conn = await pool.connect(request.connect_timeout_s)
            resp = RawResponse(conn, request.method, loop)
            conn.resp = resp
            assert conn.transport is not None
            conn.transport.write(head + body if body else head)
            request.sent_at = loop.time()
            try:
                await resp.head_fut
            except UpstreamError:
                if reused and not resp.got_headers and not resp._chunks:
                    continue  # a stale keep-alive connection: once more on a fresh one
                raise
            except BaseException:
                conn.abort()
                raise
            return resp
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        for pool, _ in self._pools.values():
            pool.close()
        self._pools.clear()
