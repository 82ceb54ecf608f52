"""An upstream's answer as the raw HTTP client reads it (``RawResponse``): its status and
headers, and its body handed on part by part as the connection reads it.

- Body bytes are queued as they arrive, one item per network read (never merged);
  reading the connection pauses when more than ``HIGH_WATER`` bytes wait for a slow
  consumer and resumes below ``LOW_WATER`` (back-pressure).
- Or, once ``pipe``d, what one network read brought is handed to the sink at the end
  of that read, in one call: no future, no task wake-up per part. Back-pressure is
  then the sink's: it calls ``pause``/``resume``.
- The head's arrival, or the failure before it, resolves ``head_fut``; a failure after
  it is raised to whoever reads the body next.
- ``abort`` closes the connection, which makes the upstream cancel the request.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING

from sentinel.proxy.upstream import BodySink, UpstreamError

if TYPE_CHECKING:
    from sentinel.proxy.upstream_conn import UpstreamConnection

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024


class RawResponse:
    """An ``UpstreamResponse`` fed by its ``UpstreamConnection``."""

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
        "parts",  # body parts read and not yet taken (or handed to the sink)
        "_buffered",
        "_waiter",
        "sink",
    )

    def __init__(
        self, conn: UpstreamConnection, method: str, loop: asyncio.AbstractEventLoop
    ) -> None:
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
        self.parts: deque[bytes] = deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self.sink: BodySink | None = None

    @property
    def body_started(self) -> bool:
        """Did any of the answer (its head, or body bytes) arrive?"""
        return self.got_headers or bool(self.parts)

    # ---- fed by the connection ------------------------------------------------------
    def feed(self, data: bytes) -> None:
        self.parts.append(data)
        if self.sink is not None:
            return  # handed on at the end of this read (``push``)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER:
            self.conn.pause()
        self._wake()

    def push(self) -> None:
        """Hand what this read brought to the sink, in one call."""
        chunks = self.parts
        sink = self.sink
        if chunks and sink is not None:
            data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()
            sink.data(data)

    def finish(self) -> None:
        self.done = True
        if self.sink is not None:
            self._end(None)
        else:
            self._wake()

    def fail(self, err: UpstreamError) -> None:
        self.error = err
        self.done = True
        if not self.head_fut.done():
            self.head_fut.set_exception(err)
        if self.sink is not None:
            self._end(err)
        else:
            self._wake()

    def _end(self, err: UpstreamError | None) -> None:
        self.push()
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.end(err)

    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    # ---- consumer side (UpstreamResponse) ---------------------------------------------
    async def _next(self) -> bytes | None:
        while True:
            if self.parts:
                data = self.parts.popleft()
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

    async def read(self) -> bytes:
        chunks = self.parts
        if self.done and self.error is None:  # all in hand (a whole answer, read at once)
            data = b"".join(chunks)
            chunks.clear()
            self._buffered = 0
            return data
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

    def pipe(self, sink: BodySink) -> None:
        self.sink = sink
        self._buffered = 0
        if self.done:
            self._end(self.error)
            return
        self.conn.resume()  # reading may have paused while the parts waited
        self.push()  # (the sink may pause it again)

    def pause(self) -> None:
        if not self.done:  # (a finished answer's connection may be back in the pool)
            self.conn.pause()

    def resume(self) -> None:
        if not self.done:
            self.conn.resume()

    def release(self) -> None:
        pass  # the connection went back to the pool when the message completed

    def abort(self) -> None:
        if not self.done:
            self.done = True
            self.conn.abort()
