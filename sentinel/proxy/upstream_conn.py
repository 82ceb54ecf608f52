"""A keep-alive HTTP/1.1 connection to an upstream (``UpstreamConnection``), the pool
of idle ones per upstream (``ConnectionPool``) and the connect itself.

- Connections are reused LIFO and dropped once idle for ``idle_s`` (below the common
  5 s server keep-alive), or when the upstream answered ``Connection: close``.
- Interim answers (``100 Continue``, ``102 Processing``, ``103 Early Hints``) are
  skipped: only a final status is the answer. A head (with the interim answers before
  it) over ``MAX_UPSTREAM_HEAD_BYTES`` is a malformed answer (``reset``), checked after
  each read, so at most that plus one read is held. Bytes that no request asked for (after
  a complete answer, or on an idle connection) close the connection: it is never
  pooled with unread bytes, so no request is handed another's answer.
- A connection reset before a body delimited by the close has ended is a failure; a
  clean close ends such a body.
- The connect deadline is judged on the socket, not on the event loop's timers: when
  it passes while Sentinel's own loop was stalled, a connection the kernel completed
  in time is used (see ``ConnectionPool.connect``).
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
from typing import cast

import httptools

from sentinel.logs import get_logger
from sentinel.proxy.rawresponse import RawResponse
from sentinel.proxy.upstream import UpstreamError

log = get_logger(__name__)

# an upstream's response head (status line, headers, interim answers before it) larger
# than this is refused as malformed: its bytes are neither kept nor relayed
MAX_UPSTREAM_HEAD_BYTES = 64 * 1024
# headers the framing of an answer rests on: kept (and then dropped at the relay) even
# when the upstream's Connection header names them
FRAMING_HEADERS = frozenset({b"connection", b"content-length", b"transfer-encoding"})


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to an upstream, answering one request at a
    time: httptools parses what it reads into the current ``RawResponse``."""

    __slots__ = (
        "pool",
        "loop",
        "transport",
        "parser",
        "resp",
        "closed",
        "idle_since",
        "paused",
        "interim",
        "stray",
        "head_n",
    )

    def __init__(self, pool: ConnectionPool, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.loop = loop  # the loop it was made on (one look-up per connection)
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.resp: RawResponse | None = None
        self.closed = False
        self.idle_since = 0.0
        self.paused = False
        self.interim = False  # parsing a 1xx answer (skipped)
        self.stray = False  # bytes came that no request asked for
        self.head_n = 0  # bytes read of the current answer's head, while it is incomplete

    # ---- asyncio.Protocol ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's do not subclass asyncio.Transport)
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        resp = self.resp
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
        if resp is not None:
            sink = resp.sink
            if sink is not None:
                # a piped body: what this read brought, in one piece (``RawResponse.push``,
                # inlined: this runs once per part of every stream)
                parts = resp.parts
                if parts:
                    data = parts.popleft() if len(parts) == 1 else b"".join(parts)
                    parts.clear()
                    sink.data(data)
            elif not resp.got_headers and self.resp is resp:
                self.head_n += len(data)  # the head is still incomplete: all of it is head
                if self.head_n > MAX_UPSTREAM_HEAD_BYTES:
                    self._fail(
                        UpstreamError(
                            "reset",
                            "malformed upstream response: head too large "
                            f"(over {MAX_UPSTREAM_HEAD_BYTES} bytes)",
                        )
                    )
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
        self.head_n = 0
        hop: bytes | None = None
        for k, v in resp.headers:
            if k == b"content-length":
                resp.content_length = int(v)
            elif k == b"content-type":
                resp.content_type = v.decode("latin-1")
            elif k == b"transfer-encoding" and b"chunked" in v.lower():
                resp.chunked = True
            elif k == b"connection":
                hop = v if hop is None else hop + b"," + v
        if hop is not None:  # the headers it names are hop-by-hop: never relayed
            named = {n.strip().lower() for n in hop.split(b",")} - FRAMING_HEADERS
            resp.headers = [(k, v) for k, v in resp.headers if k not in named]
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
            if resp.sink is not None:
                resp.parts.append(body)  # handed on at the end of this read
            else:
                resp.feed(body)

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


class ConnectionPool:
    """The idle keep-alive connections to one upstream (scheme, host, port), and new
    connections to it."""

    def __init__(
        self, host: str, port: int, tls: ssl.SSLContext | None, max_idle: int, idle_s: float
    ) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.max_idle = max_idle
        self.idle_s = idle_s
        self.idle: list[UpstreamConnection] = []
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

    def put(self, conn: UpstreamConnection) -> None:
        if len(self.idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self.idle.append(conn)

    def get(self) -> UpstreamConnection | None:
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

    async def connect(self, timeout: float) -> UpstreamConnection:
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
            await connect_socket(sock, addr, started + timeout)
            _, conn = await loop.create_connection(
                lambda: UpstreamConnection(self, loop),
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


async def connect_socket(sock: socket.socket, addr: tuple[object, ...], deadline: float) -> None:
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
