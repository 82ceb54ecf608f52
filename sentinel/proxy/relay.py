"""Relaying a committed upstream answer (``Opened``) to the client.

A whole answer leaves in one write. A stream is piped: the upstream connection hands
what each network read brought straight to ``_Pipe.data``, which writes it to the client
at once (one write per read, no task wake-up per part); the relaying task only waits for
the stream's end. When the client falls behind (its transport paused writing), reading
the upstream pauses until it catches up (so a slow client gets every byte, in order, and
the upstream is read no faster than the client reads). A client that has gone stops the
upstream at its next part. One watchdog timer per stream guards both its total time
limit and its idle limit (``proxy.stream_idle_timeout_s``: a stream that has begun and
then sends nothing that long; detected in ``_Watchdog._check``, the one place); the per-
part cost is one clock read. A stream that fails after its first byte ends with one
parseable SSE error event (an SSE stream) or a cut connection (any other body), never a
silent, well-formed end. The error event is an event of its own: when the upstream
broke off in the middle of an event (the last part relayed does not end with a blank
line), a blank line ends that one first.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from sentinel.http1.response import BEHIND, GONE, Response
from sentinel.payloads.exchange import Exchange
from sentinel.proxy.attempt import Opened
from sentinel.proxy.errors import sse_error_event
from sentinel.proxy.metrics import ProxyMetrics
from sentinel.proxy.request import DROP_RESPONSE_HEADERS
from sentinel.proxy.tier import ProxyRequest, Tier
from sentinel.proxy.upstream import UpstreamError, UpstreamResponse


def meta_headers(ex: Exchange) -> list[tuple[bytes, bytes]]:
    """What Sentinel tells the client about the exchange: its id, the serving tier,
    the tiers passed over."""
    out = [(b"x-request-id", ex.rid.encode())]
    if ex.tier != "none":
        out.append((b"x-sentinel-upstream", ex.tier.encode()))
    hops = ex.hops
    out.append((b"x-sentinel-fallback-hops", str(len(hops)).encode()))
    if hops:
        out.append((b"x-sentinel-fallbacks", ",".join(f"{t}={r}" for t, r in hops).encode()))
    return out


def relayed_headers(headers: list[tuple[bytes, bytes]], ex: Exchange) -> list[tuple[bytes, bytes]]:
    """The upstream's headers fit for the client (not ``DROP_RESPONSE_HEADERS``; those
    its ``Connection`` header names are gone already: ``UpstreamConnection``), and
    Sentinel's own."""
    out = [(k, v) for k, v in headers if k not in DROP_RESPONSE_HEADERS]
    out += meta_headers(ex)
    return out


def served(ex: Exchange, tier: Tier, resp: UpstreamResponse) -> None:
    """Note the tier whose answer the client gets."""
    ex.tier = tier.name
    ex.upstream = tier.url_base()
    ex.status = resp.status


class _Watchdog:
    """Cancels the relaying task at the stream's total deadline, or once nothing has
    arrived for ``idle_s``; ``expired`` says which. The timer re-arms itself lazily."""

    __slots__ = ("loop", "task", "total", "idle_s", "last", "expired", "timer", "client_behind")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        task: asyncio.Task[object],
        total: float,
        idle_s: float,
    ) -> None:
        self.loop = loop
        self.task = task
        self.total = total
        self.idle_s = idle_s
        self.last = loop.time()
        self.expired: str | None = None
        self.client_behind = False  # waiting for the client: the upstream is not idle
        self.timer: asyncio.TimerHandle | None = loop.call_at(
            min(total, self.last + idle_s), self._check
        )

    def _check(self) -> None:
        now = self.loop.time()
        if self.client_behind:
            self.last = now
        if now >= self.total:
            self.expired = "total"
        elif now - self.last >= self.idle_s:
            self.expired = "idle"
        else:
            self.timer = self.loop.call_at(min(self.total, self.last + self.idle_s), self._check)
            return
        self.timer = None
        self.task.cancel()

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class _Pipe:
    """The sink of a piped stream (``UpstreamResponse.pipe``): each part to the client as
    it is read, back-pressure both ways, and the stream's end as a future."""

    __slots__ = ("out", "ex", "upstream", "dog", "loop", "done", "last")

    def __init__(
        self,
        out: Response,
        ex: Exchange,
        upstream: UpstreamResponse,
        dog: _Watchdog,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.out = out
        self.ex = ex
        self.upstream = upstream
        self.dog = dog
        self.loop = loop
        self.done: asyncio.Future[None] = loop.create_future()
        self.last = b""  # the last part relayed (whether it ended an event: ``ended``)

    def data(self, data: bytes) -> None:
        said = self.out.write_part(data)
        if said == GONE:
            # the client has gone: its connection's loss cancels the relay; the
            # upstream stops now, not after what it still sends
            self.upstream.abort()
            return
        self.last = data  # one store per part: the check waits for a failure (``ended``)
        self.ex.capture(data)
        self.dog.last = self.loop.time()
        if said == BEHIND:
            self.behind()

    def behind(self) -> None:
        """The client is behind: stop reading the upstream until it catches up."""
        self.dog.client_behind = True
        self.upstream.pause()

    def caught_up(self) -> None:
        dog = self.dog
        if dog.client_behind:
            dog.client_behind = False
            dog.last = self.loop.time()
            self.upstream.resume()

    def ended(self) -> bool:
        """Whether the relayed bytes end an SSE event (a blank line). A last part too
        short to tell says no: an extra blank line before the error event is harmless
        (no event), an error event glued onto a partial one is not parseable."""
        return self.last.endswith((b"\n\n", b"\r\n\r\n", b"\r\r"))

    def end(self, error: UpstreamError | None) -> None:
        if not self.done.done():
            if error is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(error)


async def relay(
    opened: Opened,
    out: Response,
    ex: Exchange,
    req: ProxyRequest,
    idle_s: float,
    metrics: ProxyMetrics,
    on_idle: Callable[[Tier, float], None] | None = None,
) -> None:
    """``on_idle(tier, idle_s)``: told when a stream's idle limit fires (stall detection)."""
    tier = opened.tier
    resp = opened.resp
    served(ex, tier, resp)
    if opened.complete:
        body = opened.first
        ex.captured = [body]
        out.whole(resp.status, relayed_headers(resp.headers, ex), body)
        ex.ttft = time.perf_counter() - ex.t0
        opened.finish(False)
        return
    upstream_failed = False
    dog: _Watchdog | None = None
    pipe: _Pipe | None = None
    try:
        ex.streamed = True
        first = opened.first
        out.start(resp.status, relayed_headers(resp.headers, ex), first)
        ex.ttft = time.perf_counter() - ex.t0
        ex.capture(first)
        loop = req.loop or asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        assert task is not None
        dog = _Watchdog(loop, task, tier.total_deadline(req, opened.started), idle_s)
        tail: tuple[str, str, int] | None = None
        pipe = _Pipe(out, ex, resp, dog, loop)
        pipe.last = first
        try:
            out.on_writable = pipe.caught_up
            resp.pipe(pipe)
            if out.paused and not dog.client_behind:  # behind since the head and first part
                pipe.behind()
            await pipe.done
        except asyncio.CancelledError:
            if dog.expired is None or task.uncancel() > 0:
                raise
            opened.abort()
            if dog.expired == "total":
                tail = ("request time limit reached while streaming", "timeout", 504)
            else:
                upstream_failed = True
                metrics.stream_idle_timeouts.labels(tier.name).inc()
                if on_idle is not None:
                    on_idle(tier, idle_s)
                tail = (
                    f"upstream {tier.name} sent nothing for {idle_s:g} s mid-stream "
                    "(proxy.stream_idle_timeout_s)",
                    "stream_idle_timeout",
                    504,
                )
        except UpstreamError as exc:
            upstream_failed = exc.upstream_fault  # a bug of ours is not the tier's failure
            tail = (f"upstream {tier.name} failed mid-stream: {exc.detail}", exc.reason, 502)
        if tail is not None:
            ex.error = tail[0]
            if "text/event-stream" not in resp.content_type:
                return  # a body left unfinished closes the connection: a visible error
            event = sse_error_event(*tail)
            # an event the upstream left unfinished is ended first, so that the error
            # is an event of its own (the partial one is the client's to discard)
            out.write(event if pipe.ended() else b"\n\n" + event)
        out.end()
    except BaseException:
        opened.abort()
        raise
    finally:
        out.on_writable = None
        if dog is not None:
            dog.cancel()
        if pipe is not None and pipe.done.done() and not pipe.done.cancelled():
            pipe.done.exception()  # a break nobody awaits any more is not an error to log
        opened.finish(upstream_failed)
