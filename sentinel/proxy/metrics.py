"""The proxy's Prometheus series, registered in the registry passed in.

What every request counts (``request``: its tier and status, its time to first byte and
duration) is kept as plain numbers and exported at scrape time (``sentinel.proxy.tally``):
a few additions per request. Series of rarer events (fallbacks, breakers, refusals) are
``prometheus_client`` metrics, their label children resolved once and cached.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from sentinel.proxy.tally import CounterTally, HistogramTally

_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)
_WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# Label values exported from 0 on (per configured tier), so that increase()/rate() in an
# alert sees the first event: a counter series born at 1 has no increase. Reasons not
# listed still appear when they happen.
FALLBACK_REASONS = (
    "not_ready",
    "starting",
    "stalled",
    "restarting",
    "draining",
    "failed",
    "stopped",
    "degraded",
    "spill",
    "tier_full",
    "queue_full",
    "queue_timeout",
    "breaker_open",
    "connect_error",
    "connect_timeout",
    "reset",
    "first_byte_timeout",
    "total_timeout",
    "status_5xx",
    "status_429",
)
REJECT_REASONS = ("capacity",)


class ProxyMetrics:
    def __init__(self, registry: CollectorRegistry, tiers: Sequence[str] = ()) -> None:
        r = registry
        self.requests = CounterTally(
            "sentinel_proxy_requests",
            "Client requests answered, by serving tier ('none' when Sentinel answered "
            "itself) and HTTP status.",
            ["tier", "status"],
            registry=r,
        )
        self.fallbacks = Counter(
            "sentinel_proxy_fallbacks",
            "Tiers passed over for a request, by tier and reason (not_ready, stalled, "
            "breaker_open, spill, queue_timeout, connect_error, reset, first_byte_timeout, "
            "status_5xx, status_429, ...).",
            ["tier", "reason"],
            registry=r,
        )
        self.breaker_state = Gauge(
            "sentinel_proxy_breaker_state",
            "Circuit breaker state per upstream: 0 closed, 1 half-open, 2 open.",
            ["upstream"],
            registry=r,
        )
        self.breaker_open_seconds = Gauge(
            "sentinel_proxy_breaker_open_period_seconds",
            "Length of the breaker's current (or next) open period.",
            ["upstream"],
            registry=r,
        )
        self.breaker_transitions = Counter(
            "sentinel_proxy_breaker_transitions",
            "Breaker state changes, by upstream and new state.",
            ["upstream", "state"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "sentinel_proxy_queue_depth",
            "Requests waiting for a slot at the local engine.",
            registry=r,
        )
        self.queue_wait = Histogram(
            "sentinel_proxy_queue_wait_seconds",
            "Time requests waited in the admission queue (queued requests only).",
            buckets=_WAIT_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "sentinel_proxy_in_flight_requests",
            "Requests in flight to each tier.",
            ["tier"],
            registry=r,
        )
        self.rejected = Counter(
            "sentinel_proxy_rejected",
            "Requests refused with 429 (no tier could take them), by reason.",
            ["reason"],
            registry=r,
        )
        self.ttft = HistogramTally(
            "sentinel_proxy_time_to_first_byte_seconds",
            "Time from the request's arrival to the first response byte relayed "
            "(time to first token for streams), per tier.",
            "tier",
            _LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = HistogramTally(
            "sentinel_proxy_request_duration_seconds",
            "Time from the request's arrival to the end of its response, per tier.",
            "tier",
            _LATENCY_BUCKETS,
            registry=r,
        )
        self.client_disconnects = Counter(
            "sentinel_proxy_client_disconnects",
            "Requests whose client went away before the response ended (upstream "
            "request cancelled).",
            ["tier"],
            registry=r,
        )
        # --- the traffic port's connections and limits (issue 15) ---
        self.stream_idle_timeouts = Counter(
            "sentinel_proxy_stream_idle_timeouts",
            "Streams ended because their upstream sent nothing for "
            "proxy.stream_idle_timeout_s, per tier.",
            ["tier"],
            registry=r,
        )
        self.connections_refused = Counter(
            "sentinel_proxy_connections_refused",
            "Client connections closed at once because proxy.limits.max_connections were open.",
            registry=r,
        )
        self.client_refusals = Counter(
            "sentinel_proxy_client_refusals",
            "Requests or connections the traffic port ended itself, by reason "
            "(header_too_large, too_many_headers, uri_too_long, body_too_large, "
            "header_timeout, body_timeout, idle_timeout, send_timeout, bad_request).",
            ["reason"],
            registry=r,
        )
        self.open_connections = Gauge(
            "sentinel_proxy_open_connections",
            "Client connections open on the traffic port.",
            registry=r,
        )
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        for tier in tiers:
            for reason in FALLBACK_REASONS:
                self.fallbacks.labels(tier, reason)
            self.client_disconnects.labels(tier)
        self._fb: dict[tuple[str, str], Counter] = {}
        self._status: dict[int, str] = {}

    def request(self, tier: str, status: int, ttft_s: float | None, latency_s: float) -> None:
        code = self._status.get(status)
        if code is None:
            code = self._status[status] = str(status)
        self.requests.add((tier, code))
        if tier not in self.latency.counts:  # a tier's two histograms appear together
            self.ttft.child(tier)
        self.latency.observe(tier, latency_s)
        if ttft_s is not None:
            self.ttft.observe(tier, ttft_s)

    # ServerEvents (sentinel.http1.server)
    def connection_refused(self, reason: str = "max_connections") -> None:
        self.connections_refused.inc()

    def client_refused(self, reason: str) -> None:
        self.client_refusals.labels(reason).inc()

    def fallback(self, tier: str, reason: str) -> None:
        key = (tier, reason)
        c = self._fb.get(key)
        if c is None:
            c = self._fb[key] = self.fallbacks.labels(tier, reason)
        c.inc()
