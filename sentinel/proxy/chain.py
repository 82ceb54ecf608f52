"""The degradation chain: ordered tiers, tried until one answers.

For each tier, in order, before anything is sent:
  - a tier with a model map is skipped for a model missing from it
    (``model_not_offered``): nobody spends a tier's key on a model it was not offered;
  - the local tier is skipped when the probes say it cannot serve (not ready,
    stalled, draining, restarting, starting, failed; degraded where configured), or
    when its waiting queue is above the spill threshold and another tier follows;
  - a tier whose circuit breaker is open is skipped;
  - a slot is taken: the local tier through admission control (wait in the queue up
    to queue_timeout_s), other tiers by their concurrency limit (skip when full).
Then the request is sent. Connection refused/reset, a first-byte timeout, a 5xx or a
429 move it to the next tier; nothing has reached the client yet, because the
response is committed only once its first body bytes are in hand (``Opened``).
A deadline (first byte, whole request) fails a tier only after the event loop has
read what the upstream's socket already holds: a head that arrived in time counts,
even when Sentinel's own loop was too busy to see it before the timer fired.
The breaker hears one outcome per request: a whole answer's success at once, a
stream's at its end (``Opened.finish``: a stream that breaks is one failure).

``begin`` sends a request to the first tier at once, from the event loop's callback
that read it, when that needs no wait (no skip, breaker closed, a free slot, an idle
connection); ``open`` then goes on from there.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from sentinel.config.schema import AdmissionConfig, BreakerConfig, TierConfig, TierKind
from sentinel.proxy.admission import Admission
from sentinel.proxy.breaker import Breaker, BreakerState
from sentinel.proxy.errors import ProxyError
from sentinel.proxy.metrics import ProxyMetrics
from sentinel.proxy.rawhttp import RawResponse, RawTransport
from sentinel.proxy.secrets import Secret
from sentinel.proxy.upstream import (
    Transport,
    UpstreamError,
    UpstreamRequest,
    UpstreamResponse,
    drain,
)
from sentinel.state import EngineState, EngineStatus

ERROR_BODY_LIMIT = 64 * 1024  # an upstream error body kept for pass-through
FULL_READ_LIMIT = 8 * 1024 * 1024  # non-SSE bodies up to this (with a length) are read whole
WAITING_METRIC = "vllm:num_requests_waiting"
# skip reasons that mean "no capacity" (-> 429) rather than "unhealthy" (-> 503)
CAPACITY_REASONS = frozenset({"queue_full", "queue_timeout", "tier_full", "spill"})
HEALTH_SKIPS = frozenset(
    {
        "not_ready",
        "starting",
        "stalled",
        "draining",
        "restarting",
        "failed",
        "stopped",
        "degraded",
        "breaker_open",
    }
)
MODEL_NOT_OFFERED = "model_not_offered"
# event-loop passes given to an upstream after a deadline's timer fired, before the
# deadline fails the request: what the socket already holds is read and handled, so a
# stall of Sentinel's own loop is never blamed on the upstream
DEADLINE_GRACE_PASSES = 8


@dataclass(slots=True)
class ProxyRequest:
    request_id: str
    method: str
    target: str  # raw path + query string, forwarded as is
    headers: dict[str, str]  # client headers fit to forward
    body: bytes
    payload: dict[str, Any] | None  # the parsed JSON body, when it is JSON
    model: str | None
    deadline: float  # loop.time() by which the whole request must end
    hops: list[tuple[str, str]] = field(default_factory=list)


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


class Exhausted(Exception):
    """No tier served the request: answer with ``error`` or relay ``failure``."""

    def __init__(self, error: ProxyError | None, failure: UpstreamFailure | None) -> None:
        super().__init__(error.message if error else f"upstream {failure and failure.status}")
        self.error = error
        self.failure = failure


class _TierFailed(Exception):
    def __init__(
        self, reason: str, health_failure: bool, failure: UpstreamFailure | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.health_failure = health_failure
        self.failure = failure


class Tier:
    def __init__(
        self,
        cfg: TierConfig,
        base_url: Callable[[], str],
        transport: Transport,
        breaker: Breaker,
        api_key: Secret | None,
        admission: Admission | None,
    ) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.local = cfg.kind == TierKind.local
        self.base_url = base_url
        self.transport = transport
        self.breaker = breaker
        self.api_key = api_key
        self.admission = admission
        self.limit = cfg.max_concurrency
        self.in_flight = 0
        self.timeouts = cfg.timeouts
        self._bodies: dict[str, bytes] = {}

    def url_base(self) -> str:
        return self.base_url().rstrip("/")

    def in_use(self) -> int:
        return self.admission.in_flight if self.admission is not None else self.in_flight

    def release(self) -> None:
        if self.admission is not None:
            self.admission.release()
        else:
            self.in_flight -= 1

    def offers(self, model: str | None) -> bool:
        """Is ``model`` offered by this tier? With a model map, only the models it
        names are (a request without a model, e.g. ``GET /v1/models``, always is)."""
        model_map = self.cfg.model_map
        return not model_map or model is None or model in model_map

    def body_for(self, req: ProxyRequest) -> bytes:
        mapped = self.cfg.model_map.get(req.model) if req.model is not None else None
        if mapped is None or req.payload is None:
            return req.body
        return json.dumps({**req.payload, "model": mapped}).encode()

    def headers_for(self, req: ProxyRequest) -> dict[str, str]:
        headers = dict(req.headers)
        if self.api_key is not None:
            headers["authorization"] = "Bearer " + self.api_key.reveal()
        elif not self.local:
            headers.pop("authorization", None)  # never hand a client's key to a third party
        headers["x-request-id"] = req.request_id
        return headers


@dataclass(slots=True)
class Begun:
    """A request ``Chain.begin`` wrote to the first tier, with its slot held."""

    tier: Tier
    resp: RawResponse
    started: float


class Opened:
    """A committed upstream response: status and headers, and the first body bytes."""

    __slots__ = (
        "tier",
        "resp",
        "first",
        "rest",
        "complete",
        "started",
        "sent",
        "counted",
        "_done",
    )

    def __init__(
        self,
        tier: Tier,
        resp: UpstreamResponse,
        first: bytes,
        rest: Any,
        complete: bool,
        started: float,
        sent: bool = False,
    ) -> None:
        self.tier = tier
        self.resp = resp
        self.first = first
        self.rest = rest  # async iterator of the remaining chunks, or None when complete
        self.complete = complete
        self.started = started
        # the response's head and first part (the whole body when complete) already
        # went to the client, from the upstream's read (``RawResponse.early``)
        self.sent = sent
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


class Chain:
    def __init__(
        self,
        tiers: list[Tier],
        status: EngineStatus,
        admission_cfg: AdmissionConfig,
        metrics: ProxyMetrics,
    ) -> None:
        if not tiers:
            raise ValueError("the degradation chain needs at least one tier")
        self.tiers = tiers
        self.status = status
        self.admission_cfg = admission_cfg
        self.metrics = metrics
        for t in tiers:
            self._watch(t)

    def _watch(self, tier: Tier) -> None:
        m = self.metrics
        m.breaker_state.labels(tier.name).set(tier.breaker.state)
        m.breaker_open_seconds.labels(tier.name).set_function(lambda b=tier.breaker: b.open_for)
        m.in_flight.labels(tier.name).set_function(tier.in_use)
        if tier.admission is not None:
            m.queue_depth.set_function(lambda a=tier.admission: a.queued)

    # ---- decisions before sending ------------------------------------------------
    def _local_skip(self, tier: Tier, index: int) -> str | None:
        st = self.status
        state = st.state()
        if state is EngineState.degraded:
            if tier.cfg.skip_when_degraded:
                return "degraded"
        elif state is not EngineState.ready:
            return state.value
        if not st.ready:
            return "not_ready"
        threshold = self.admission_cfg.spill_waiting_threshold
        if threshold is not None and index < len(self.tiers) - 1:
            waiting = st.engine_metrics.get(WAITING_METRIC)
            if waiting is not None and waiting > threshold:
                return "spill"
        return None

    def _hop(self, req: ProxyRequest, tier: Tier, reason: str) -> None:
        req.hops.append((tier.name, reason))
        self.metrics.fallback(tier.name, reason)

    @staticmethod
    def _try_slot(tier: Tier) -> bool:
        adm = tier.admission
        if adm is not None:
            return adm.try_acquire()
        if tier.in_flight >= tier.limit:
            return False
        tier.in_flight += 1
        return True

    async def _take_slot(self, tier: Tier, req: ProxyRequest, index: int) -> str | None:
        adm = tier.admission
        if self._try_slot(tier):
            return None
        if adm is None:
            return "tier_full"
        refusal = await adm.acquire(req.deadline)
        self.metrics.queue_wait.observe(adm.last_wait_s)
        if refusal is not None:
            return refusal.value
        # the engine may have changed while we waited
        reason = self._local_skip(tier, index)
        if reason is not None:
            adm.release()
        return reason

    # ---- the walk ------------------------------------------------------------------
    def begin(self, req: ProxyRequest) -> Begun | None:
        """Send ``req`` to the first tier now, synchronously, when nothing would make it
        wait or skip that tier: not skipped by the probes, breaker closed, a slot free
        at once, an idle connection (a transport with ``start``). The slot is then
        held for ``open(req, begun)``. None: nothing was taken; ``open`` does it all."""
        tier = self.tiers[0]
        transport = tier.transport
        if not isinstance(transport, RawTransport):
            return None
        if tier.breaker.state is not BreakerState.closed or not tier.offers(req.model):
            return None
        if tier.local and self._local_skip(tier, 0) is not None:
            return None
        if not self._try_slot(tier):
            return None
        resp = transport.start(self._upstream_request(tier, req))
        if resp is None:
            tier.release()
            return None
        return Begun(tier, resp, asyncio.get_running_loop().time())

    async def open(self, req: ProxyRequest, begun: Begun | None = None) -> Opened:
        """Walk the tiers to a committed response; with ``begun``, the first tier's
        request is already out (``begin``)."""
        failure: UpstreamFailure | None = None
        capacity = False
        breaker_wait: float | None = None
        for index, tier in enumerate(self.tiers):
            early = begun if index == 0 else None
            reason: str | None = None
            if early is None:  # else begin() checked this tier and holds its slot
                reason = None if tier.offers(req.model) else MODEL_NOT_OFFERED
                if reason is None and tier.local:
                    reason = self._local_skip(tier, index)
                if reason is None and not tier.breaker.allow():
                    reason = "breaker_open"
                    ra = tier.breaker.retry_after()
                    breaker_wait = ra if breaker_wait is None else min(breaker_wait, ra)
                if reason is None:
                    try:
                        reason = await self._take_slot(tier, req, index)
                    except BaseException:
                        tier.breaker.release()
                        raise
                    if reason is not None:
                        tier.breaker.release()
            if reason is not None:
                capacity = capacity or reason in CAPACITY_REASONS
                self._hop(req, tier, reason)
                continue
            try:
                opened = await self._attempt(tier, req, early)
            except _TierFailed as f:
                tier.release()
                if f.health_failure:
                    tier.breaker.failure()
                else:
                    tier.breaker.release()
                self._hop(req, tier, f.reason)
                if f.failure is not None:
                    failure = f.failure
                if f.reason == "status_429":
                    capacity = True
                continue
            except BaseException:
                tier.release()
                tier.breaker.release()
                raise
            if opened.complete or tier.breaker.state is BreakerState.half_open:
                tier.breaker.success()  # else a stream's outcome is counted at its end
                opened.counted = True
            return opened
        raise self._exhausted(req, failure, capacity, breaker_wait)

    def _exhausted(
        self,
        req: ProxyRequest,
        failure: UpstreamFailure | None,
        capacity: bool,
        breaker_wait: float | None,
    ) -> Exhausted:
        hops = ", ".join(f"{t}: {r}" for t, r in req.hops)
        loop = asyncio.get_running_loop()
        if loop.time() >= req.deadline:
            return Exhausted(
                ProxyError(
                    504, f"request timed out before any tier answered ({hops})", "request_timeout"
                ),
                None,
            )
        if capacity and (failure is None or failure.status == 429):
            retry = max(1, math.ceil(self.admission_cfg.queue_timeout_s))
            self.metrics.rejected.labels("capacity").inc()
            return Exhausted(
                ProxyError(
                    429,
                    f"every tier is at capacity; retry later ({hops})",
                    "capacity_exceeded",
                    retry_after=retry,
                ),
                None,
            )
        if failure is not None:
            return Exhausted(None, failure)
        reasons = {r for _, r in req.hops}
        if reasons == {MODEL_NOT_OFFERED}:
            return Exhausted(
                ProxyError(
                    404,
                    f"The model {req.model!r} is not offered by any tier ({hops})",
                    "model_not_found",
                    param="model",
                ),
                None,
            )
        if reasons <= HEALTH_SKIPS | {MODEL_NOT_OFFERED}:
            wait = max(1, math.ceil(breaker_wait)) if breaker_wait else 1
            return Exhausted(
                ProxyError(
                    503,
                    f"no upstream can serve now ({hops})",
                    "no_upstream_available",
                    retry_after=wait,
                ),
                None,
            )
        last = req.hops[-1][1] if req.hops else ""
        if last in ("first_byte_timeout", "total_timeout"):
            return Exhausted(
                ProxyError(504, f"upstream timed out ({hops})", "upstream_timeout"), None
            )
        return Exhausted(ProxyError(502, f"upstream failed ({hops})", "upstream_error"), None)

    @staticmethod
    def _answered(tier: Tier, resp: RawResponse, started: float) -> Opened:
        """The Opened of a begun response its early hook already answered with."""
        stream = commit_kind(resp) == "stream"
        return Opened(tier, resp, b"", resp if stream else None, not stream, started, True)

    @staticmethod
    def _upstream_request(tier: Tier, req: ProxyRequest) -> UpstreamRequest:
        return UpstreamRequest(
            req.method,
            tier.url_base(),
            req.target,
            tier.headers_for(req),
            tier.body_for(req),
            tier.timeouts.connect_s,
        )

    @staticmethod
    def first_byte_deadline(tier: Tier, req: ProxyRequest, started: float) -> float:
        """The loop time by which ``tier``'s answer to ``req`` must have begun."""
        t = tier.timeouts
        return min(started + t.first_byte_s, started + t.total_s, req.deadline)

    @staticmethod
    def total_deadline(tier: Tier, req: ProxyRequest, started: float) -> float:
        """The loop time by which ``tier``'s whole answer to ``req`` must have ended."""
        return min(started + tier.timeouts.total_s, req.deadline)

    async def _attempt(self, tier: Tier, req: ProxyRequest, begun: Begun | None) -> Opened:
        """``tier``'s committed answer by its first-byte deadline. The exchange runs as
        its own task; when the deadline passes, the loop first gets a few passes to read
        what the socket holds (see ``DEADLINE_GRACE_PASSES``) and only an exchange
        that still has nothing is a ``first_byte_timeout``."""
        loop = asyncio.get_running_loop()
        started = loop.time() if begun is None else begun.started
        ureq = begun.resp.request if begun is not None else None
        if ureq is None:
            ureq = self._upstream_request(tier, req)
        deadline = self.first_byte_deadline(tier, req, started)
        exchange = loop.create_task(self._exchange(tier, req, begun, started, ureq))
        try:
            while True:
                if not exchange.done():
                    await _until(exchange, deadline)
                if not exchange.done():
                    for _ in range(DEADLINE_GRACE_PASSES):
                        await asyncio.sleep(0)
                        if exchange.done():
                            break
                if exchange.done():
                    break
                # the first byte is due ``first_byte_s`` after the request was written
                sent = ureq.sent_at
                later = deadline if sent is None else self.first_byte_deadline(tier, req, sent)
                if later <= deadline or loop.time() >= later:
                    break
                deadline = later
        except BaseException:  # the request is cancelled (its client went away)
            _drop(exchange)
            if begun is not None:
                begun.resp.abort()
            raise
        if exchange.done():
            return exchange.result()  # an Opened, or the exchange's own _TierFailed
        _drop(exchange)
        if begun is not None and begun.resp.committed:
            # answered from the upstream's read as the deadline passed, before this
            # task saw it: the client has it, so it stands (no fallback, no error)
            return self._answered(tier, begun.resp, started)
        if loop.time() >= req.deadline:
            raise ProxyError(504, "request timed out (proxy.request_timeout_s)", "request_timeout")
        raise _TierFailed("first_byte_timeout", health_failure=True)

    async def _exchange(
        self,
        tier: Tier,
        req: ProxyRequest,
        begun: Begun | None,
        started: float,
        ureq: UpstreamRequest,
    ) -> Opened:
        resp: UpstreamResponse | None = begun.resp if begun is not None else None
        try:
            if begun is None:
                resp = await tier.transport.send(ureq)
            else:
                transport = tier.transport
                assert isinstance(transport, RawTransport)
                resp = await transport.resume(begun.resp)
            kind = commit_kind(resp)
            if kind == "fail":
                if begun is not None:
                    begun.resp.early = None
                status = resp.status
                body = await drain(resp, ERROR_BODY_LIMIT)
                raise _TierFailed(
                    "status_429" if status == 429 else "status_5xx",
                    health_failure=status != 429,
                    failure=UpstreamFailure(tier.name, status, resp.headers, body),
                )
            if begun is not None and resp is begun.resp:
                if begun.resp.early is not None:
                    assert begun.resp.decided is not None
                    await begun.resp.decided
                if begun.resp.committed:  # already answered, from the upstream's read
                    return self._answered(tier, begun.resp, started)
            if kind == "whole":
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
            raise _TierFailed(exc.reason, health_failure=exc.upstream_fault) from exc
        except _TierFailed:
            raise
        except BaseException:
            if resp is not None and not (begun is not None and begun.resp.committed):
                resp.abort()
            raise


async def _until(task: asyncio.Task[Opened], deadline: float) -> None:
    """Wait until ``task`` is done or the loop time ``deadline`` has come, whichever is
    first (``asyncio.wait`` with a timeout, at less cost per request)."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    wake = functools.partial(_wake, waiter)
    task.add_done_callback(wake)
    timer = loop.call_at(deadline, wake)
    try:
        await waiter
    finally:
        timer.cancel()
        task.remove_done_callback(wake)


def _wake(waiter: asyncio.Future[None], *_: object) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _retrieve(task: asyncio.Task[Opened]) -> None:
    if not task.cancelled():
        task.exception()  # an outcome nobody waits for any more: not an error to log


def _drop(exchange: asyncio.Task[Opened]) -> None:
    """Stop an exchange the request no longer waits for; an answer it already opened is
    closed (its upstream cancels it). The slot is the caller's to give back."""
    if not exchange.done():
        exchange.cancel()
        exchange.add_done_callback(_retrieve)
        return
    if not exchange.cancelled() and exchange.exception() is None:
        opened = exchange.result()
        if not opened.sent:
            opened.abort()


def build_tier(
    cfg: TierConfig,
    base_url: Callable[[], str],
    transport: Transport,
    breaker_cfg: BreakerConfig,
    admission_cfg: AdmissionConfig,
    metrics: ProxyMetrics,
    api_key: Secret | None,
) -> Tier:
    def on_change(b: Breaker, state: BreakerState) -> None:
        metrics.breaker_state.labels(b.name).set(int(state))
        metrics.breaker_transitions.labels(b.name, state.name).inc()

    breaker = Breaker(cfg.name, breaker_cfg, on_change=on_change)
    admission = None
    if cfg.kind == TierKind.local:
        admission = Admission(
            min(cfg.max_concurrency, admission_cfg.max_concurrency),
            admission_cfg.max_queue,
            admission_cfg.queue_timeout_s,
        )
    return Tier(cfg, base_url, transport, breaker, api_key, admission)
