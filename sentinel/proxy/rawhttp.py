"""A lean HTTP/1.1 upstream client: asyncio protocols, the httptools parser, a keep-alive
pool per upstream. Chosen over aiohttp/httpx because it costs a fraction of their
per-request CPU (see bench/proxy.py): the proxy's added latency is mostly this client.

- ``RawTransport`` (here) writes a request on a pooled or new connection and returns
  its response once the final head is in. A reused connection that dies before any
  response byte is retried once on a fresh connection (the server closed it while
  idle); any other failure is the caller's.
- ``sentinel.proxy.upstream_conn``: the connection (parsing, framing, 1xx, stray
  bytes, resets), the pool of idle connections, the connect judged on the socket.
- ``sentinel.proxy.rawresponse``: the response, its body handed on one item per
  network read, with back-pressure; ``abort`` closes the connection, which makes the
  upstream cancel the request.
"""

from __future__ import annotations

import ssl
from urllib.parse import urlsplit

from sentinel.proxy.rawresponse import RawResponse
from sentinel.proxy.upstream import UpstreamError, UpstreamRequest
from sentinel.proxy.upstream_conn import ConnectionPool


class RawTransport:
    """``Transport`` over ``ConnectionPool``s, one per scheme/host/port seen."""

    def __init__(self, limit: int = 64, idle_s: float = 4.0) -> None:
        self._limit = limit
        self._idle_s = idle_s
        self._pools: dict[str, tuple[ConnectionPool, str]] = {}
        self._tls: ssl.SSLContext | None = None

    def _pool(self, base: str) -> tuple[ConnectionPool, str]:
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
            got = (
                ConnectionPool(u.hostname, port, tls, self._limit, self._idle_s),
                u.path.rstrip("/"),
            )
            self._pools[base] = got
        return got

    def _head(self, request: UpstreamRequest, pool: ConnectionPool, prefix: str) -> bytes:
        lines = [
            f"{request.method} {prefix}{request.target} HTTP/1.1\r\n".encode("latin-1"),
            b"host: ",
            pool.host_header,
            b"\r\n",
        ]
        for k, v in request.headers:
            lines += (k, b": ", v, b"\r\n")
        body = request.body
        if body or request.method in ("POST", "PUT", "PATCH"):
            lines.append(b"content-length: %d\r\n" % len(body))
        lines.append(b"\r\n")
        return b"".join(lines)

    async def send(self, request: UpstreamRequest) -> RawResponse:
        pool, prefix = self._pool(request.base_url)
        body = request.body
        head = self._head(request, pool, prefix)
        for attempt in (0, 1):
            conn = pool.get() if attempt == 0 else None
            reused = conn is not None
            if conn is None:
                conn = await pool.connect(request.connect_timeout_s)
            loop = conn.loop
            resp = RawResponse(conn, request.method, loop)
            conn.resp = resp
            assert conn.transport is not None
            conn.transport.write(head + body if body else head)
            request.sent_at = loop.time()
            try:
                await resp.head_fut
            except UpstreamError:
                if reused and not resp.body_started:
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
