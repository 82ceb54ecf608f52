"""``sentinel_attach_*`` series (engine.mode: attach, issue 18): whether the engine's
processes are identified and verified, and why recoveries were not done.

Read from ``AttachedEngine.describe()`` at scrape time (plain data, never waits)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

# every reason a recovery is refused: each exported from 0, so increase() sees the first
REFUSALS = (
    "recovery_disabled",  # engine.attach.recovery: false
    "no_processes",  # no engine process identified (none, or several candidates)
    "unverified",  # identified, but not seen listening on the engine URL's port
    "starting",  # the engine is still within its start-up grace
    "holdoff",  # within engine.attach.recovery_holdoff_s of the last recovery
    "engine_changed",  # another engine than the one judged (restarted meanwhile)
)


class AttachCollector:
    def __init__(self, describe: Callable[[], dict[str, Any]]) -> None:
        self._describe = describe

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        doc = self._describe()
        identified = GaugeMetricFamily(
            "sentinel_attach_engine_identified",
            "1 while the attached engine's API server is identified among the processes.",
        )
        identified.add_metric([], 1.0 if doc["pids"].get("api_server") else 0.0)
        yield identified
        verified = GaugeMetricFamily(
            "sentinel_attach_engine_verified",
            "1 while the identified API server's tree listens on the engine URL's port "
            "(the only state in which a recovery may signal it).",
        )
        verified.add_metric([], 1.0 if doc.get("verified") else 0.0)
        yield verified
        problem = GaugeMetricFamily(
            "sentinel_attach_discovery_problem",
            "1 while discovery reports a problem (see /status attach.problem).",
        )
        problem.add_metric([], 1.0 if doc.get("problem") else 0.0)
        yield problem
        refused = CounterMetricFamily(
            "sentinel_attach_recoveries_refused",
            "Recoveries of the attached engine not done, by why (see /status attach).",
            labels=["why"],
        )
        for why, n in sorted(({w: 0 for w in REFUSALS} | doc.get("refused", {})).items()):
            refused.add_metric([why], float(n))
        yield refused
