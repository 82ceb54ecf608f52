"""The degradation chain: ordered tiers, tried until one answers.

For each tier, in order, before anything is sent:
  - a tier with a model map is skipped for a model missing from it
    (``model_not_offered``), and for a body whose model Sentinel cannot read, e.g. a
    multipart upload (``model_unreadable``): nobody spends a tier's key on a model it
    was not offered;
  - the local tier is skipped when the probes say it cannot serve (not ready,
    stalled, draining, restarting, starting, failed; degraded where configured), or
    when its waiting queue is above the spill threshold and another tier follows;
  - a tier whose circuit breaker is open is skipped;
  - a slot is taken: the local tier through admission control (wait in the queue up
    to queue_timeout_s), other tiers by their concurrency limit (skip when full).
Then the request is sent (``sentinel.proxy.attempt``). Connection refused/reset, a
first-byte timeout, a 5xx or a 429 move it to the next tier; nothing has reached the
client yet, because the response is committed only once its first body bytes are in
hand (``Opened``). A deadline fails a tier only after the event loop has read what the
upstream's socket already holds (see ``attempt``).
The breaker hears one outcome per request: a whole answer's success at once, a
stream's at its end (``Opened.finish``: a stream that breaks is one failure).
"""

from __future__ import annotations

import asyncio
import math

from sentinel.config.schema import AdmissionConfig
from sentinel.proxy.attempt import Opened, TierFailed, UpstreamFailure, attempt
from sentinel.proxy.breaker import BreakerState
from sentinel.proxy.errors import ProxyError
from sentinel.proxy.metrics import ProxyMetrics
from sentinel.proxy.tier import MODEL_NOT_OFFERED, MODEL_UNREADABLE, ProxyRequest, Tier
from sentinel.state import EngineState, EngineStatus

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
MODEL_REASONS = frozenset({MODEL_NOT_OFFERED, MODEL_UNREADABLE})


class Exhausted(Exception):
    """No tier served the request: answer with ``error`` or relay ``failure``."""

    def __init__(self, error: ProxyError | None, failure: UpstreamFailure | None) -> None:
        super().__init__(error.message if error else f"upstream {failure and failure.status}")
        self.error = error
        self.failure = failure


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

    async def _take_slot(self, tier: Tier, req: ProxyRequest, index: int) -> str | None:
        adm = tier.admission
        if tier.try_acquire():
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
    async def open(self, req: ProxyRequest) -> Opened:
        """Walk the tiers to a committed response."""
        failure: UpstreamFailure | None = None
        capacity = False
        breaker_wait: float | None = None
        for index, tier in enumerate(self.tiers):
            reason = tier.model_refusal(req)
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
                opened = await attempt(tier, req)
            except TierFailed as f:
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
        if reasons <= MODEL_REASONS:
            if req.model is None:
                why = (
                    "its model cannot be read from a body that is not JSON, and every tier "
                    "that could serve it offers only the models of its model_map"
                )
            else:
                why = f"the model {req.model!r} is not offered by any tier"
            return Exhausted(
                ProxyError(
                    404, f"{why[0].upper()}{why[1:]} ({hops})", "model_not_found", param="model"
                ),
                None,
            )
        if reasons <= HEALTH_SKIPS | MODEL_REASONS:
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
