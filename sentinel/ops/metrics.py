"""/metrics rendering: Sentinel's registry, then the engine's series passed through.

Both halves are text format 0.0.4. The engine block is prepared when the engine
is scraped (``sentinel.probes.exposition``: one HELP/TYPE per family, only
``vllm:*`` families, names made promtool-clean), so a render only concatenates
and never waits on the engine. Families cannot collide: Sentinel's are all
``sentinel_*``.

``SentinelRegistry`` guards every custom collector registered in it (the rule of
prometheus_client's process collector: collect at scrape time, never fail a scrape):
one whose ``collect()`` raises loses its own families for that scrape, is logged (at
most once a minute) and counted in ``sentinel_metrics_collector_errors_total``; the
rest of ``/metrics`` is served.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.metrics import MetricWrapperBase

from sentinel.logs import LogThrottle, get_logger

log = get_logger(__name__)
LOG_EVERY_S = 60.0

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Guarded:
    """One custom collector; an exception in its collect() never leaves it."""

    def __init__(self, inner: Any, name: str, errors: Counter, clock: Callable[[], float]) -> None:
        self.inner = inner
        self.name = name
        self._errors = errors.labels(name)
        self._throttle = LogThrottle(LOG_EVERY_S, clock)
        if callable(getattr(inner, "describe", None)):
            self.describe = inner.describe  # the registry reads names from it

    def collect(self) -> Iterator[Any]:
        try:
            families = list(self.inner.collect())
        except Exception as exc:  # noqa: BLE001 - one collector never fails a scrape
            self._errors.inc()
            extra = self._throttle.allow()
            if extra is not None:
                log.error(
                    "a metrics collector failed; its series are left out of this scrape",
                    collector=self.name,
                    error=f"{type(exc).__name__}: {exc}",
                    **extra,
                )
            return iter(())
        return iter(families)


class SentinelRegistry(CollectorRegistry):
    """A CollectorRegistry whose custom collectors (not Counter/Gauge/... objects) are
    guarded: see the module's docstring."""

    def __init__(self, auto_describe: bool = True, clock: Callable[[], float] = time.monotonic):
        self._guards: dict[int, _Guarded] = {}
        self._clock = clock
        super().__init__(auto_describe=auto_describe)
        self.collector_errors = Counter(
            "sentinel_metrics_collector_errors",
            "Scrapes in which one of Sentinel's metric collectors raised (its series were "
            "left out of that scrape).",
            ["collector"],
            registry=self,
        )

    def register(self, collector: Any) -> None:
        if isinstance(collector, MetricWrapperBase | _Guarded):
            super().register(collector)
            return
        # (a collector of one family names it: ``collector_label``; else its class)
        label = getattr(collector, "collector_label", None) or type(collector).__name__
        guarded = _Guarded(collector, label, self.collector_errors, self._clock)
        super().register(guarded)
        self._guards[id(collector)] = guarded

    def unregister(self, collector: Any) -> None:
        super().unregister(self._guards.pop(id(collector), collector))


class MetricsRenderer:
    def __init__(
        self, registry: CollectorRegistry, passthrough: Callable[[], str] | None = None
    ) -> None:
        self.registry = registry
        self.passthrough = passthrough

    def render(self) -> bytes:
        own = generate_latest(self.registry)
        if self.passthrough is None:
            return own
        engine = self.passthrough()
        return own + engine.encode() if engine else own
