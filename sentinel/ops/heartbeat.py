"""Event-loop heartbeat: proves Sentinel's loop turns, measures how late it turns.

A task sleeps ``period_s`` and records how much later than asked it woke up
(the loop's lag). /livez fails only when the heartbeat itself stops (its task
died, or the loop was blocked past the timeout), never because of the engine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric


class LoopMonitor:
    def __init__(self, period_s: float = 0.25, clock: Callable[[], float] = time.monotonic) -> None:
        self.period_s = period_s
        self._clock = clock
        self.started_at = clock()
        self.last_beat = self.started_at
        self.lag_s = 0.0
        self.max_lag_s = 0.0  # since the last scrape of /metrics

    async def run(self) -> None:
        while True:
            t0 = self._clock()
            await asyncio.sleep(self.period_s)
            self.beat(t0)

    def beat(self, slept_from: float) -> None:
        now = self._clock()
        self.lag_s = max(0.0, now - slept_from - self.period_s)
        self.max_lag_s = max(self.max_lag_s, self.lag_s)
        self.last_beat = now

    def heartbeat_age_s(self) -> float:
        return max(0.0, self._clock() - self.last_beat)

    def info(self) -> dict[str, float]:
        return {
            "heartbeat_age_s": round(self.heartbeat_age_s(), 3),
            "loop_lag_s": round(self.lag_s, 4),
            "uptime_s": round(self._clock() - self.started_at, 1),
        }

    def alive(self, timeout_s: float) -> tuple[bool, dict[str, float]]:
        return self.heartbeat_age_s() <= timeout_s, self.info()

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        lag = GaugeMetricFamily(
            "sentinel_event_loop_lag_seconds",
            "How late Sentinel's event loop ran its last heartbeat.",
        )
        lag.add_metric([], self.lag_s)
        yield lag
        worst = GaugeMetricFamily(
            "sentinel_event_loop_lag_max_seconds",
            "Worst event loop lag since the previous scrape.",
        )
        worst.add_metric([], self.max_lag_s)
        self.max_lag_s = self.lag_s
        yield worst
        age = GaugeMetricFamily(
            "sentinel_event_loop_heartbeat_age_seconds",
            "Seconds since the event loop heartbeat last ran.",
        )
        age.add_metric([], self.heartbeat_age_s())
        yield age
