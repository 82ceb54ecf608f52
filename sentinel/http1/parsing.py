"""The parser's side of a client connection (``RequestParsing``, mixed into
``HttpConnection``): httptools' callbacks build one whole ``Request`` at a time and
enforce the limits that are counted while parsing (request line, header count, body
size, a declared Content-Length), hold a ``100 Continue`` back behind earlier answers,
drop a chunked body's trailers, and read the body of an Upgrade offer (which llhttp
skips) so that the request is answered as plain HTTP/1.1."""

from __future__ import annotations

from sentinel.http1 import refusals
from sentinel.http1.refusals import Refused
from sentinel.http1.response import Request

MAX_PIPELINED = 16  # whole requests waiting behind the one being handled, then reading pauses


class RequestParsing:
    """Mixed into ``HttpConnection``; uses its parser, limits, request in progress,
    queue, timer (``_arm``) and reading controls."""

    def on_message_begin(self) -> None:
        self._req = Request()
        self._url_size = 0
        self._arm("head", self.limits.header_timeout_s)

    def on_url(self, url: bytes) -> None:
        req = self._req
        assert req is not None
        self._url_size += len(url)
        if self._url_size > self.limits.max_request_line_bytes:
            raise Refused(refusals.uri_too_long(self.limits))
        req._parts.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self._req
        assert req is not None
        if not self._in_head:
            return  # a chunked body's trailer: dropped (its bytes count against the body)
        if len(req.headers) >= self.limits.max_headers:
            raise Refused(refusals.too_many_headers(self.limits))
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
        self._body_fed = 0
        limit = self.limits.max_body_bytes
        expect = chunked = False
        length = 0
        for k, v in req.headers:
            if k == b"content-length":
                if v.isdigit():
                    length = int(v)
                    if length > limit:
                        raise Refused(refusals.body_too_large(length, self.limits))
            elif k == b"transfer-encoding":
                chunked = True
            elif k == b"expect" and v.lower() == b"100-continue":
                expect = True
            elif k == b"connection" and b"close" in v.lower():
                # llhttp keeps an HTTP/1.0 connection whose header says both keep-alive
                # and close: close wins
                if any(t.strip() == b"close" for t in v.lower().split(b",")):
                    req.keep_alive = False
        # (llhttp refuses a message with both; if it did not, the total cap bounds it)
        self._body_left = 0 if chunked else length
        if parser.should_upgrade() and req.method != "CONNECT":
            # an Upgrade offer (curl --http2 sends h2c): llhttp would skip its body
            if chunked:
                raise Refused(refusals.upgrade_not_supported())
            self._raw_left = length
        self._continue_due = expect
        if not expect:
            self._arm("body", self.limits.body_timeout_s)
        elif self._active is None and not self._queue:
            self._send_continue()
        else:
            self._phase = None  # the body is awaited once the 100 is sent, in its turn

    def _send_continue(self) -> None:
        self._continue_due = False
        self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._arm("body", self.limits.body_timeout_s)

    def on_body(self, body: bytes) -> None:
        req = self._req
        assert req is not None
        req._size += len(body)
        if self._body_left:
            self._body_left -= len(body)
        if req._size > self.limits.max_body_bytes:
            raise Refused(refusals.body_too_large(req._size, self.limits))
        req._parts.append(body)

    def on_message_complete(self) -> None:
        req = self._req
        assert req is not None
        if self._raw_left:  # an Upgrade offer: its body is still to come (_raw_body)
            self._raw_req = req
            self._req = None
            return
        self._req = None
        parts = req._parts
        req.body = parts[0] if len(parts) == 1 else b"".join(parts)
        req._parts = []
        self._in_head = True
        self._head_size = 0
        self._body_left = 0
        self._continue_due = False
        self._phase = None
        self._queue.append(req)
        self._queued_bytes += req._size
        if self._active is None:
            self._next()
        if len(self._queue) >= MAX_PIPELINED or self._queued_bytes > self.limits.max_body_bytes:
            self._pause_reading()

    def _raw_body(self, data: bytes) -> None:
        req = self._raw_req
        assert req is not None
        take = data[: self._raw_left]
        self._raw_left -= len(take)
        req._size += len(take)
        req._parts.append(take)
        if self._raw_left == 0:  # whole: handled as HTTP/1.1, what follows is dropped
            self._raw_req = None
            self._req = req
            self.on_message_complete()
            self._stop_reading()
