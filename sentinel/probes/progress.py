"""Forward progress: scrape the engine's /metrics, detect a stalled engine.

Stalled: requests are running (``vllm:num_requests_running`` > 0, or Sentinel's own
inference probe unanswered: see ``ProbeRunner``) and no token moved
(``vllm:generation_tokens_total`` + ``vllm:prompt_tokens_total``) for
``stall_window_s``. A hung engine keeps answering /health and /metrics with its
last numbers, so "running but nothing moves" is the tell.

A local stream that got nothing for ``proxy.stream_idle_timeout_s`` mid-stream
(``StallDetector.stream_idle``) is the same tell, seen sooner: stalled at once
(``stream_stalled``) unless the latest scrape had just seen tokens move (then the next
scrape decides), and stalled until a scrape sees tokens move again or an inference
probe is answered.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import httpx
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from sentinel.probes.exposition import Exposition, parse_exposition, sample_values

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
GENERATION_TOKENS = "vllm:generation_tokens_total"
PROMPT_TOKENS = "vllm:prompt_tokens_total"


class StallDetector:
    """Pure stall math over (time, running, token counter) observations."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.reset()

    def reset(self) -> None:
        self._tokens: float | None = None
        self._last_progress: float | None = None
        self.stalled_since: float | None = None
        # the latest scrape: when, the one before it, and whether tokens moved between them
        self._observed_at: float | None = None
        self._previous_at: float | None = None
        self._moved_last = False
        self._stream_suspect: str | None = None  # a stream-idle reason the next scrape checks
        self.stream_stalled: str | None = None  # a stream-idle reason that stands

    def stream_idle(self, now: float, idle_s: float, reason: str) -> str | None:
        """A local stream got nothing mid-stream for ``idle_s``. Return the stall reason
        when it stands now: no scrape saw tokens move while that stream waited (a frozen
        engine, or one whose /metrics no longer answers). When the latest scrape saw tokens
        move within that wait, the engine was busy with other requests: the next scrape
        decides (``observe``)."""
        since = now - idle_s
        if self._moved_last and self._previous_at is not None and self._previous_at >= since:
            self._stream_suspect = reason
            return None
        self.stream_stalled = reason
        if self.stalled_since is None:
            self.stalled_since = now
        return reason

    def answered(self) -> bool:
        """An inference answered after a stream-idle report: the engine generates, so no
        stream stall stands (the evidence for engines without token counters). True when
        one was dropped."""
        had = self.stream_stalled is not None or self._stream_suspect is not None
        self.stream_stalled = self._stream_suspect = None
        if had:
            self.stalled_since = None
        return had

    def observe(self, now: float, running: float, tokens: float) -> str | None:
        """Feed one scrape; return the stall reason, or None while progressing or idle."""
        known = self._tokens is not None
        moved = not known or tokens != self._tokens  # a drop is a counter reset
        self._tokens = tokens
        self._previous_at, self._observed_at = self._observed_at, now
        self._moved_last = known and moved
        if self._moved_last:  # tokens move (the engine's own probe moves some): no stream stall
            self._stream_suspect = self.stream_stalled = None
        elif known and self._stream_suspect is not None:
            self.stream_stalled, self._stream_suspect = self._stream_suspect, None
        if self.stream_stalled is not None:
            if self.stalled_since is None:
                self.stalled_since = now
            return self.stream_stalled
        if moved or running <= 0 or self._last_progress is None:
            self._last_progress = now
            self.stalled_since = None
            return None
        quiet = now - self._last_progress
        if quiet < self.window_s:
            return None
        if self.stalled_since is None:
            self.stalled_since = now
        # stable text (no running clock in it): EngineStatus listeners fire on changes
        return f"{running:g} requests running and no token generated for {self.window_s:g}s"


class EngineMetricsScraper:
    """Fetches the engine's exposition; keeps the last good one for /metrics passthrough."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        timeout_s: float,
        promtool_names: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._timeout_s = timeout_s
        self._promtool_names = promtool_names
        self._clock = clock
        self._text: str | None = None  # the last good scrape, parsed only when passed on
        self._parsed: Exposition | None = None
        self.last_at: float | None = None
        self.last_generation: int | None = None
        self.last_ok = False
        self.last_error: str = ""
        self.last_duration_s: float | None = None
        self.failures_total = 0
        self.parse_errors_total = 0

    def forget(self) -> None:
        """Drop the cached exposition (the engine generation it came from is gone)."""
        self._text, self._parsed = None, None
        self.last_at, self.last_generation = None, None

    @property
    def last(self) -> Exposition | None:
        """The last good scrape as a clean exposition (parsed on first use, then cached)."""
        if self._parsed is None and self._text is not None:
            self._parsed = parse_exposition(self._text, promtool_names=self._promtool_names)
        return self._parsed

    async def scrape(self, base_url: str, generation: int) -> dict[str, float] | None:
        """Fetch the engine's /metrics; return the summed sample values (None on failure)."""
        t0 = time.perf_counter()
        try:
            resp = await self._client.get(
                f"{base_url}/metrics",
                headers={"Accept": "text/plain; version=0.0.4"},
                timeout=self._timeout_s,
            )
            if resp.status_code != 200:
                raise _ScrapeError(f"HTTP {resp.status_code}")
            text = resp.text
        except (httpx.HTTPError, _ScrapeError) as exc:
            self.last_ok = False
            self.last_error = f"{type(exc).__name__}: {exc}"[:200]
            self.failures_total += 1
            self.last_duration_s = time.perf_counter() - t0
            return None
        # only the values now; the full parse waits until /metrics asks (see ``last``)
        values, errors = sample_values(text)
        self.parse_errors_total += errors
        self._text, self._parsed = text, None
        self.last_at, self.last_generation = self._clock(), generation
        self.last_ok, self.last_error = True, ""
        self.last_duration_s = time.perf_counter() - t0
        return values

    def passthrough_text(self, generation: int, max_age_s: float) -> str:
        """The engine's series for /metrics: only when fresh and from the current generation."""
        if self._text is None or self.last_at is None or self.last_generation != generation:
            return ""
        if self._clock() - self.last_at > max_age_s:
            return ""
        expo = self.last
        return expo.text if expo is not None else ""

    # prometheus_client collector protocol: built at scrape time, never raises
    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "sentinel_engine_metrics_scrape_success",
            "1 when the last scrape of the engine's /metrics succeeded.",
        )
        up.add_metric([], 1.0 if self.last_ok else 0.0)
        yield up
        if self.last_duration_s is not None:
            dur = GaugeMetricFamily(
                "sentinel_engine_metrics_scrape_duration_seconds",
                "Duration of the last scrape of the engine's /metrics.",
            )
            dur.add_metric([], self.last_duration_s)
            yield dur
        if self.last_at is not None:
            age = GaugeMetricFamily(
                "sentinel_engine_metrics_age_seconds",
                "Seconds since the engine's /metrics were last scraped successfully.",
            )
            age.add_metric([], max(0.0, self._clock() - self.last_at))
            yield age
        fails = CounterMetricFamily(
            "sentinel_engine_metrics_scrape_failures",
            "Failed scrapes of the engine's /metrics.",
        )
        fails.add_metric([], float(self.failures_total))
        yield fails
        errs = CounterMetricFamily(
            "sentinel_engine_metrics_parse_errors",
            "Lines or families of the engine's exposition dropped as malformed.",
        )
        errs.add_metric([], float(self.parse_errors_total))
        yield errs


class _ScrapeError(Exception):
    pass
