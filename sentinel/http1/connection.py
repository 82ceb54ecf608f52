"""One client connection of the traffic port (``HttpConnection``, an asyncio protocol
fed by httptools' parser callbacks): the one class that owns a connection's flow
control, like aiohttp's base_protocol.py.

It reads requests (never handing llhttp more head than the limits allow), refuses what
breaks the limits or the framing (answered in its turn, then the connection lingers
and closes), keeps pipelining order (requests on one connection are handled one at a
time, answered in order), and controls flow in both directions: reading pauses while
requests wait behind the one being handled; a writer awaits ``Response.drain`` while
the client's unsent bytes are above the transport's high-water mark, and no new answer
is made for a client that pipelines without reading.

A request is handed to the handler only once whole (head and body): the proxy needs
the whole body to check it, and no handler ever waits on a slow client's upload.
One connection has at most one timer; its phase (idle, head, body, linger) says what
it guards, and moving to a later deadline costs no timer call.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING

import httptools

from sentinel.http1 import refusals
from sentinel.http1.parsing import MAX_PIPELINED, RequestParsing
from sentinel.http1.refusals import Refusal, Refused
from sentinel.http1.response import STATUS_LINES, Request, Response, status_line
from sentinel.http1.timer import ConnectionTimer
from sentinel.logs import get_logger, raised_at
from sentinel.proxy.errors import error_body

if TYPE_CHECKING:
    from sentinel.http1.server import HttpServer

log = get_logger(__name__)

WRITE_HIGH_WATER = 64 * 1024
LINGER_S = 2.0  # after a refusal: the client's further bytes are dropped this long
# the shortest request llhttp completes ("GET / HTTP/1.1\n\n"): head bytes are fed in
# slices of at most (room left in the queue) x this, so one feed cannot complete more
# requests than the queue may still take
MIN_REQUEST_BYTES = 16
# a chunked body's framing (chunk sizes, extensions, trailers) beyond max_body_bytes
FRAMING_ALLOWANCE = 64 * 1024


class HttpConnection(RequestParsing, ConnectionTimer, asyncio.Protocol):
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
        self._body_left = 0  # a Content-Length body's bytes not yet fed
        self._body_fed = 0  # bytes fed since the end of the head (body, framing, trailers)
        self._pending = b""  # read while reading was paused: fed on resume
        # an Upgrade offer's body (llhttp skips it): read here, then the offer is ignored
        self._raw_req: Request | None = None
        self._raw_left = 0
        self._queue: deque[Request | Refusal] = deque()
        self._queued_bytes = 0
        self._read_paused = False
        self._active: asyncio.Task[None] | None = None
        self._active_resp: Response | None = None
        self._counted = False
        self._client: object = None  # its address, counted against max_connections_per_client
        self._continue_due = False
        self._next_due = False  # the next request waits for the client to read
        # the one timer: phase None / "idle" / "head" / "body", and its deadline
        self._phase: str | None = None
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        # the client takes none of the bytes held for it by then: abort (0: not due)
        self._send_deadline = 0.0
        self._send_mark = 0  # bytes held for the client when the deadline was set

    # ---- the connection ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # (uvloop's is no subclass)
        server = self.server
        if len(server.connections) >= self.limits.max_connections:
            server.events.connection_refused("max_connections")
            self.closing = True
            transport.abort()
            return
        if self.limits.max_connections_per_client:
            client = server.admit_client(transport)
            if client is None:
                server.events.connection_refused("max_connections_per_client")
                self.closing = True
                transport.abort()
                return
            self._client = client
        self._counted = True
        server.connections.add(self)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self._arm("idle", self.limits.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self._counted:
            self._counted = False
            self.server.connections.discard(self)
            if self._client is not None:
                self.server.release_client(self._client)
                self._client = None
        self._phase = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._queue.clear()
        self._abandon()
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _abandon(self) -> None:
        """The client has gone: the answer it awaited is cancelled (and its upstream
        request with it), now, not once the unsent bytes for it are flushed."""
        task = self._active
        resp = self._active_resp
        if task is not None and not task.done() and resp is not None and not resp.ended:
            if not resp.gone:
                resp.gone = True
                task.cancel()

    def pause_writing(self) -> None:
        self.write_paused = True
        self._await_send()

    def resume_writing(self) -> None:
        self.write_paused = False
        t = self.transport
        if t is None or not t.is_closing():  # (a close's flush stays bounded)
            self._send_deadline = 0.0
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)
        resp = self._active_resp
        if resp is not None and resp.on_writable is not None:
            resp.on_writable()
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
        t = self.transport
        if t is not None:
            t.close()  # waits for what the client has not taken yet: bounded
            if t.get_write_buffer_size():
                self._await_send()

    @property
    def queued(self) -> bool:
        """Requests (or a refusal) wait behind the answer being made."""
        return bool(self._queue)

    # ---- reading ----------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if self._pending:
            data = self._pending + data
            self._pending = b""
        if self._raw_req is not None:
            self._raw_body(data)
            return
        limits = self.limits
        max_head = limits.max_request_line_bytes + limits.max_header_bytes
        max_fed = limits.max_body_bytes + FRAMING_ALLOWANCE
        while data:
            if self._read_paused:
                # no more requests are parsed while reading pauses: what was read is
                # kept (one read at most) and fed on resume
                self._pending = data
                return
            if self._in_head:
                # never hand llhttp more head than the limits allow: bytes beyond them
                # are refused unread (httptools would gather them all in memory); nor
                # more than could complete the requests the queue may still take
                head_room = max_head - self._head_size
                queue_room = MAX_PIPELINED - len(self._queue)
                # every head ends with a blank line (CRLF CRLF, or LF LF where llhttp is
                # lenient): a read holds at least as many of them as requests it completes
                ends = data.count(b"\n\r\n") + data.count(b"\n\n")
                if len(data) <= head_room and ends < queue_room:
                    # the usual read (one request, or a few): within the head limit and
                    # holding fewer head ends than the queue has room for, so it is fed
                    # whole (a head that begins in it is counted from the next read on:
                    # at most the limit again)
                    part, data = data, b""
                else:
                    room = min(head_room, max(1, queue_room) * MIN_REQUEST_BYTES)
                    part, data = data[:room], data[room:]
                self._head_size += len(part)
            elif self._body_left:
                # a Content-Length body (on_body counts it down): fed up to its end, so
                # the next head is counted from its first byte
                part, data = data[: self._body_left], data[self._body_left :]
            else:
                # chunked: body, framing and trailers together are bounded
                part, data = data, b""
                self._body_fed += len(part)
                if self._body_fed > max_fed:
                    self._refuse(refusals.body_too_large(self._body_fed, limits))
                    return
            try:
                self.parser.feed_data(part)
            except httptools.HttpParserUpgrade as exc:
                # an Upgrade (h2c, websocket) is not offered: the request is answered
                # as HTTP/1.1 (its body read here: llhttp leaves it), and the
                # connection closes after it
                if self._raw_req is not None:
                    self._raw_body(part[exc.args[0] :] + data)
                else:
                    self._stop_reading()
                return
            except httptools.HttpParserCallbackError as exc:
                cause = exc.__context__
                if isinstance(cause, Refused):
                    self._refuse(cause.refusal)
                else:
                    extra = self.server.log_throttle.allow(raised_at(cause) if cause else None)
                    if extra is not None:
                        log.error(
                            f"{self.server.what}_parser_callback_failed", exc_info=cause, **extra
                        )
                    self._refuse(refusals.internal_error())
                return
            except httptools.HttpParserError as exc:
                self._refuse(refusals.malformed(exc))
                return
            if self._in_head and self._head_size >= max_head:
                self._refuse(refusals.header_too_large(self.limits))
                return

    def eof_received(self) -> bool | None:
        # a half-closed client is a gone client: the transport closes (once what it
        # holds for the client is flushed, which may be never for a client that stopped
        # reading), and the answer in progress is cancelled at once
        self._abandon()
        t = self.transport
        if t is not None and t.get_write_buffer_size():
            self._await_send()  # (the flush is bounded by send_timeout_s)
        return None

    def _pause_reading(self) -> None:
        if not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()
            if self._phase in ("head", "body"):
                # a request cut by the pause waits on us, not on the client: its timer
                # starts again on resume (a client that does not read meets the send
                # deadline instead)
                self._phase = None

    def _stop_reading(self) -> None:
        self.closing = True
        self._phase = None
        self._pause_reading()
        if self._active is None:
            self._next()

    def _refuse(self, refusal: Refusal) -> None:
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
        if isinstance(item, Refusal):
            self._answer_refusal(item)
            return
        self._queued_bytes -= item._size
        if self._read_paused and not self.closing and len(self._queue) < MAX_PIPELINED // 2:
            self._read_paused = False
            self.transport.resume_reading()
            if self._req is not None:
                if self._in_head:
                    self._arm("head", self.limits.header_timeout_s)
                elif not self._continue_due:
                    self._arm("body", self.limits.body_timeout_s)
            if self._pending:  # (not from inside a feed: on the next pass)
                self.loop.call_soon(self._feed_pending)
        resp = Response(self, item)
        self._active_resp = resp
        task = self.loop.create_task(self.server.handler(item, resp))
        self._active = task
        task.add_done_callback(self._handled)

    def _feed_pending(self) -> None:
        if self._pending and not self._read_paused:
            self.data_received(b"")

    def _handled(self, task: asyncio.Task[None]) -> None:
        resp = self._active_resp
        if task.cancelled():
            exc: BaseException | None = None
        else:
            exc = task.exception()
        if exc is not None:
            extra = self.server.log_throttle.allow(raised_at(exc))
            if extra is not None:  # (a bug a client can repeat at will: not every time)
                log.error(
                    f"{self.server.what}_request_failed",
                    error=f"{type(exc).__name__}: {exc}",
                    exc_info=exc,
                    **extra,
                )
        if resp is not None and not resp.ended:
            if not resp.started and not resp.gone:
                what = self.server.what
                body = error_body(500, f"internal error in Sentinel's {what}", "internal_error")
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

    def _answer_refusal(self, refusal: Refusal) -> None:
        body = error_body(refusal.status, refusal.message, refusal.code)
        head = STATUS_LINES.get(refusal.status) or status_line(refusal.status)
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
