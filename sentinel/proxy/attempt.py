"""One tier's try at a request (``attempt``): sent, and committed (``Opened``) only once
its first body bytes are in hand, by the tier's first-byte deadline.

- A 5xx or a 429 is no answer: its body (up to ``ERROR_BODY_LIMIT``) is kept as an
  ``UpstreamFailure`` to relay if no later tier serves, and the try fails
  (``TierFailed``), as do connection failures and the first-byte deadline.
- A non-SSE body of known length up to ``FULL_READ_LIMIT`` is read whole before it is
  committed; anything else is committed with its first part and relayed part by part.
  For a whole body, its head is the first byte: the first-byte deadline ends there and
  the body is due by the tier's total deadline (``total_timeout``; a break while it is
  read is a ``reset``); nothing has reached the client yet, so the next tier may serve.
- A deadline fails the try only after the event loop has read what the upstream's
  socket already holds: when the deadline passes, the loop gets
  ``DEADLINE_GRACE_PASSES`` passes before it counts (the exchange runs in the request's
  own task, guarded by one timer: no task or future of its own). A head that
  arrived in time counts, even when Sentinel's own loop was too busy to see it before
  the timer fired. The first-byte clock starts when the request was written
  (``UpstreamRequest.sent_at``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Literal

from sentinel.proxy.errors import ProxyError
from sentinel.proxy.tier import ProxyRequest, Tier
from sentinel.proxy.upstream import UpstreamError, UpstreamRequest, UpstreamResponse, drain

ERROR_BODY_LIMIT = 64 * 1024  # an upstream error body kept for pass-through
FULL_READ_LIMIT = 8 * 1024 * 1024  # non-SSE bodies up to this (with a length) are read whole
# event-loop passes given to an upstream after a deadline's timer fired, before the
# deadline fails the request: what the socket already holds is read and handled, so a
# stall of Sentinel's own loop is never blamed on the upstream
DEADLINE_GRACE_PASSES = 8


def commit_kind(resp: UpstreamResponse) -> Literal["fail", "whole", "stream"]:
    """How an upstream answer is taken: ``fail`` (5xx, 429: try the next tier), ``whole``
    (a non-SSE body of known, bounded length: read whole, then answered) or ``stream``
    (committed with its first body part, relayed part by part)."""
    status = resp.status
    if status >= 500 or status == 429:
        return "fail"
    cl = resp.content_length
    if cl is not None and cl <= FULL_READ_LIMIT and "text/event-stream" not in resp.content_type:
        return "whole"
    return "stream"


@dataclass(slots=True)
class UpstreamFailure:
    """An upstream's own error answer (5xx/429), relayed when no later tier serves."""

    tier: str
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


class TierFailed(Exception):
    """A tier did not answer: ``reason`` names why; ``health_failure`` says whether its
    breaker hears of it; ``failure`` is its own error answer, if it gave one."""

    def __init__(
        self, reason: str, health_failure: bool, failure: UpstreamFailure | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.health_failure = health_failure
        self.failure = failure


class Opened:
    """A committed upstream response: status and headers, and the first body bytes."""

    __slots__ = ("tier", "resp", "first", "rest", "complete", "started", "counted", "_done")

    def __init__(
        self,
        tier: Tier,
        resp: UpstreamResponse,
        first: bytes,
        rest: Any,
        complete: bool,
        started: float,
    ) -> None:
        self.tier = tier
        self.resp = resp
        self.first = first
        self.rest = rest  # async iterator of the remaining chunks, or None when complete
        self.complete = complete
        self.started = started
        # the breaker was told of a success when this was opened: a whole answer, or
        # a stream that was a half-open breaker's trial (its first bytes close it)
        self.counted = False
        self._done = False

    def finish(self, upstream_failed: bool = False) -> None:
        """Give the tier's slot back. A stream's outcome goes to the breaker here, once:
        a failure on ``upstream_failed`` (it broke after it was committed), else a
        success. (Only a half-open trial's stream, already counted as a success when
        its first bytes closed the breaker, is counted again when it breaks.)"""
        if self._done:
            return
        self._done = True
        self.tier.release()
        if upstream_failed:
            self.tier.breaker.failure()
        elif not self.counted:
            self.tier.breaker.success()

    def abort(self) -> None:
        """Close the upstream connection now (the upstream cancels the request)."""
        if not self.complete:
            self.resp.abort()


async def attempt(tier: Tier, req: ProxyRequest) -> Opened:
    """``tier``'s committed answer by its first-byte deadline. The exchange runs in the
    request's own task, guarded by one timer (``_FirstByteGuard``): when the deadline
    passes, the loop first gets a few passes to read what the socket holds (see
    ``DEADLINE_GRACE_PASSES``) and only an exchange that still has nothing is cancelled,
    as a ``first_byte_timeout``. The caller holds the tier's slot."""
    loop = req.loop or asyncio.get_running_loop()
    task = asyncio.current_task(loop)
    assert task is not None
    started = loop.time()
    ureq = tier.upstream_request(req)
    deadline = tier.first_byte_deadline(req, started)
    guard = _FirstByteGuard(loop, task, tier, req, ureq, started, deadline)
    try:
        return await _exchange(tier, started, ureq, guard)
    except asyncio.CancelledError:
        if not guard.expired or task.uncancel() > 0:
            raise  # the request is cancelled (its client went away)
    finally:
        guard.cancel()
    if loop.time() >= req.deadline:
        raise ProxyError(504, "request timed out (proxy.request_timeout_s)", "request_timeout")
    raise TierFailed(guard.reason, health_failure=True)


class _FirstByteGuard:
    """Cancels the request's task (``expired``) once its exchange has had nothing by the
    first-byte deadline, after ``DEADLINE_GRACE_PASSES`` loop passes: what the socket
    already holds is read first. The first byte is due ``first_byte_s`` after the
    request was written (``UpstreamRequest.sent_at``), so a deadline reached before the
    write (a slow connect, a stall of Sentinel's own loop) moves on to that later one."""

    __slots__ = (
        "loop",
        "task",
        "tier",
        "req",
        "ureq",
        "deadline",
        "timer",
        "expired",
        "off",
        "reason",
        "started",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        task: asyncio.Task[Any],
        tier: Tier,
        req: ProxyRequest,
        ureq: UpstreamRequest,
        started: float,
        deadline: float,
    ) -> None:
        self.loop = loop
        self.task = task
        self.tier = tier
        self.req = req
        self.ureq = ureq
        self.deadline = deadline
        self.expired = False
        self.off = False
        # what an expiry is; ``total_timeout`` once a whole answer's head is in (then the
        # timer, when it fires, moves on to the tier's total deadline: no re-arm before)
        self.reason = "first_byte_timeout"
        self.started = started
        self.timer: asyncio.Handle | None = loop.call_at(deadline, self._passes, 0)

    def _passes(self, n: int) -> None:
        self.timer = None
        if self.off:
            return
        if n < DEADLINE_GRACE_PASSES:
            self.timer = self.loop.call_soon(self._passes, n + 1)
            return
        if self.reason == "total_timeout":  # a whole body, after its head: due by total_s
            later = self.tier.total_deadline(self.req, self.started)
        else:
            sent = self.ureq.sent_at
            later = self.deadline if sent is None else self.tier.first_byte_deadline(self.req, sent)
        if later > self.deadline and self.loop.time() < later:
            self.deadline = later
            self.timer = self.loop.call_at(later, self._passes, 0)
            return
        self.expired = True
        self.off = True
        self.task.cancel()

    def cancel(self) -> None:
        self.off = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


async def _exchange(
    tier: Tier, started: float, ureq: UpstreamRequest, guard: _FirstByteGuard
) -> Opened:
    resp: UpstreamResponse | None = None
    try:
        resp = await tier.transport.send(ureq)
        kind = commit_kind(resp)
        if kind == "fail":
            status = resp.status
            body = await drain(resp, ERROR_BODY_LIMIT)
            raise TierFailed(
                "status_429" if status == 429 else "status_5xx",
                health_failure=status != 429,
                failure=UpstreamFailure(tier.name, status, resp.headers, body),
            )
        if kind == "whole":
            # the head is in: the body is read under the total deadline only
            guard.reason = "total_timeout"
            first = await resp.read()
            resp.release()
            return Opened(tier, resp, first, None, True, started)
        rest = resp.chunks()
        try:
            first = await anext(rest)
        except StopAsyncIteration:
            resp.release()
            return Opened(tier, resp, b"", None, True, started)
        return Opened(tier, resp, first, rest, False, started)
    except UpstreamError as exc:
        if resp is not None:
            resp.abort()
        raise TierFailed(exc.reason, health_failure=exc.upstream_fault) from exc
    except TierFailed:
        raise
    except BaseException:
        if resp is not None:
            resp.abort()
        raise
