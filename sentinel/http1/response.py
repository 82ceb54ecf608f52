"""One request as the connection hands it over (``Request``, whole: head and body) and
the one response to it (``Response``): framing (a whole body with its length, or a
chunked stream; for HTTP/1.0 a body that runs to the close), status lines, and the
``connection: close`` a response carries when the connection ends after it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sentinel.http1.connection import HttpConnection


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


Handler = Callable[[Request, "Response"], Awaitable[None]]


def status_line(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return b"HTTP/1.1 %d %s\r\n" % (status, phrase.encode())


STATUS_LINES = {s.value: status_line(s.value) for s in HTTPStatus}
# answers that never have a body: no Content-Length is sent for them, nor any body
NO_BODY_STATUSES = frozenset({204, 304})
# what ``Response.write_part`` says: the client has gone (nothing written), the part is
# written, or it is written and the client is behind (its transport paused writing)
GONE, WRITTEN, BEHIND = 0, 1, 2


class Response:
    """The one response to one request, written onto its connection: ``whole`` (a body
    of known length, head and body in one write) or ``start`` / ``write`` / ``end``
    (a stream, chunked for HTTP/1.1 clients; for HTTP/1.0 the body runs to the close).
    A writer of a stream awaits ``drain`` when ``paused`` (the client is behind)."""

    __slots__ = (
        "_conn",
        "_keep_alive",
        "_chunked",
        "_version10",
        "_bodiless",
        "started",
        "ended",
        "gone",
        "on_writable",
    )

    def __init__(self, conn: HttpConnection, req: Request) -> None:
        self._conn = conn
        # a HEAD request's answer is closed after (its body would be read as the next)
        self._keep_alive = req.keep_alive and req.method != "HEAD"
        self._chunked = req.version == "1.1"
        self._version10 = req.version == "1.0"
        self._bodiless = req.method == "HEAD"  # (a whole answer's head only)
        self.started = False
        self.ended = False
        self.gone = False  # the client went away before the response ended
        # called when the client, behind (``paused``), has caught up (a piped stream)
        self.on_writable: Callable[[], None] | None = None

    def _head(self, status: int, headers: list[tuple[bytes, bytes]], framing: bytes) -> bytes:
        line = STATUS_LINES.get(status) or status_line(status)
        parts = [line]
        for k, v in headers:
            parts.append(k + b": " + v + b"\r\n")
        parts.append(framing)
        # the connection closes after its last answer: one that has answers queued
        # behind it (a refusal, read before the close) does not carry the close
        conn = self._conn
        if not self._keep_alive or (conn.closing and not conn.queued):
            self._keep_alive = False
            parts.append(b"connection: close\r\n")
        elif self._version10:
            # an HTTP/1.0 client asked to keep the connection: it closes unless told yes
            parts.append(b"connection: keep-alive\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def whole(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        if self.started:
            raise RuntimeError("response already started")
        self.started = self.ended = True
        if status in NO_BODY_STATUSES:  # no length, no body (RFC 9110 8.6, 15.4.5)
            self._conn.write(self._head(status, headers, b""))
            return
        head = self._head(status, headers, b"content-length: %d\r\n" % len(body))
        self._conn.write(head if self._bodiless else head + body)

    def head_only(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """The answer to a HEAD request, its headers as given (the length its GET would
        have, where the caller knows it): no body, no framing of ours."""
        if self.started:
            raise RuntimeError("response already started")
        self.started = self.ended = True
        self._conn.write(self._head(status, headers, b""))

    def transport_info(self, name: str) -> object:
        """The client connection's ``get_extra_info(name)`` ("peername", "sockname")."""
        t = self._conn.transport
        return t.get_extra_info(name) if t is not None else None

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

    def write_part(self, data: bytes) -> int:
        """``write`` for a piped stream's part, in one call (a stream's per-part cost):
        ``GONE`` (nothing written) when the client's connection is closing or closed,
        else ``BEHIND`` when the client is behind after it (``paused``), else
        ``WRITTEN``."""
        conn = self._conn
        t = conn.transport
        if t is None or t.is_closing():
            return GONE
        if data:
            t.write(b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data)
        return BEHIND if conn.write_paused else WRITTEN

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
