"""The transport seam between the chain and an upstream, and a mock transport for tests.

``Transport.send`` returns once the upstream's final status line and headers are in; the
body is then read whole (``read``) or part by part as it arrives (``chunks``, one item
per network read, never merged), or handed to a ``BodySink`` as it is read (``pipe``: no
task wakes per part; ``pause``/``resume`` give back-pressure). ``abort`` closes the
connection at once, which is how a cancelled request reaches the upstream (vLLM aborts a
request whose connection closes). Every failure crosses the seam as ``UpstreamError``: a
short ``reason`` for fallback decisions and metrics, and ``upstream_fault``, False when
the failure is a bug of ours (it must not count against a healthy upstream's breaker).

``sentinel.proxy.rawhttp.RawTransport`` is the production client; ``MockTransport``
answers from a handler function, as httpx's ``MockTransport`` does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol


class UpstreamError(Exception):
    """A failure talking to an upstream: connect_error, connect_timeout, reset, or
    internal_error (``upstream_fault`` False: ours, not the upstream's)."""

    def __init__(self, reason: str, detail: str, upstream_fault: bool = True) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.upstream_fault = upstream_fault


@dataclass(slots=True)
class UpstreamRequest:
    method: str
    base_url: str  # scheme://host[:port][/prefix], no trailing slash
    target: str  # path and query, as the client sent them
    headers: list[tuple[bytes, bytes]]  # lower-case names; no host or content-length
    body: bytes
    connect_timeout_s: float
    # loop.time() when the transport wrote the request (the first-byte clock starts
    # there: a connect, or a stall of Sentinel's own loop before the write, is not
    # the upstream's time to answer)
    sent_at: float | None = None


class BodySink(Protocol):
    """Where ``UpstreamResponse.pipe`` hands a body: ``data`` as it is read (what one
    network read brought, never merged across reads), then ``end`` once (``error``:
    the body broke)."""

    def data(self, data: bytes) -> None: ...

    def end(self, error: UpstreamError | None) -> None: ...


class UpstreamResponse(Protocol):
    """What the chain and the relay use of an upstream's answer."""

    status: int
    headers: list[tuple[bytes, bytes]]  # lower-case names, as received
    content_length: int | None
    content_type: str

    async def read(self) -> bytes: ...

    def chunks(self) -> AsyncIterator[bytes]: ...

    def pipe(self, sink: BodySink) -> None:
        """From now on, the body parts not yet taken from ``chunks`` go to ``sink`` as
        they arrive (those already in hand at once)."""

    def pause(self) -> None:
        """Read no more of the body until ``resume`` (the sink's reader is behind)."""

    def resume(self) -> None: ...

    def release(self) -> None: ...

    def abort(self) -> None: ...


class Transport(Protocol):
    """What the chain uses of an upstream client."""

    async def send(self, request: UpstreamRequest) -> UpstreamResponse: ...

    async def aclose(self) -> None: ...


async def drain(resp: UpstreamResponse, limit: int) -> bytes:
    """Read at most ``limit`` bytes of an error body (for pass-through), then drop the rest."""
    out = bytearray()
    async for chunk in resp.chunks():
        out += chunk
        if len(out) >= limit:
            resp.abort()
            break
    return bytes(out[:limit])


# ---- the mock transport ------------------------------------------------------------------
@dataclass
class MockResponse:
    """An answer of ``MockTransport``: ``body`` whole, or ``parts`` one by one (each after
    ``part_delay_s``), then ``error`` (a failure mid-body) if given."""

    status: int = 200
    body: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    parts: Iterable[bytes] | None = None
    part_delay_s: float = 0.0
    error: UpstreamError | None = None
    content_type: str = "application/json"
    aborted: bool = False
    released: bool = False
    content_length: int | None = field(init=False, default=None)
    _parts: AsyncIterator[bytes] | None = field(init=False, default=None, repr=False)
    _pump: asyncio.Task[None] | None = field(init=False, default=None, repr=False)
    _resumed: asyncio.Event = field(init=False, default_factory=asyncio.Event, repr=False)

    def __post_init__(self) -> None:
        names = {k for k, _ in self.headers}
        if b"content-type" not in names:
            self.headers.append((b"content-type", self.content_type.encode()))
        for k, v in self.headers:
            if k == b"content-type":
                self.content_type = v.decode("latin-1")
        streamed = self.parts is not None or self.error is not None
        self.content_length = None if streamed else len(self.body)
        if self.content_length is not None and b"content-length" not in names:
            self.headers.append((b"content-length", str(self.content_length).encode()))
        self._resumed.set()

    async def read(self) -> bytes:
        return b"".join([p async for p in self.chunks()])

    def chunks(self) -> AsyncIterator[bytes]:
        """The body's parts (one iterator per response: ``pipe`` continues it)."""
        if self._parts is None:
            self._parts = self._gen()
        return self._parts

    async def _gen(self) -> AsyncIterator[bytes]:
        parts = [self.body] if self.parts is None else self.parts
        for part in parts:
            if self.aborted:
                return
            if self.part_delay_s:
                await asyncio.sleep(self.part_delay_s)
            if part:
                yield part
        if self.error is not None and not self.aborted:
            raise self.error

    def pipe(self, sink: BodySink) -> None:
        self._pump = asyncio.get_running_loop().create_task(self._push(sink))

    async def _push(self, sink: BodySink) -> None:
        try:
            async for part in self.chunks():
                await self._resumed.wait()
                if self.aborted:
                    return
                sink.data(part)
        except UpstreamError as exc:
            sink.end(exc)
            return
        if not self.aborted:
            sink.end(None)

    def pause(self) -> None:
        self._resumed.clear()

    def resume(self) -> None:
        self._resumed.set()

    def release(self) -> None:
        self.released = True

    def abort(self) -> None:
        self.aborted = True
        self._resumed.set()


Handler = Callable[[UpstreamRequest], Awaitable[MockResponse]]


class MockTransport:
    """A ``Transport`` answering every request from ``handler`` (an async function that
    returns a ``MockResponse`` or raises ``UpstreamError``); it keeps the requests."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[UpstreamRequest] = []
        self.responses: list[MockResponse] = []
        self.closed = False

    async def send(self, request: UpstreamRequest) -> MockResponse:
        self.requests.append(request)
        request.sent_at = asyncio.get_running_loop().time()
        resp = await self.handler(request)
        self.responses.append(resp)
        return resp

    async def aclose(self) -> None:
        self.closed = True
