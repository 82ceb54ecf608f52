"""Event-loop heartbeat: proves Sentinel's loop turns, measures how late it turns.

A task sleeps ``period_s`` and records how much later than asked it woke up
(the loop's lag). /livez fails only when the heartbeat itself stops (its task
died, or the loop was blocked past the timeout), never because of the engine.

``sentinel_event_loop_lag_max_seconds`` is the worst lag over the last ``LAG_WINDOW_S``
seconds (a small ring of per-second maxima): the same whoever scrapes and how often (two
Prometheus servers, or a person's curl between scrapes, do not reset each other's max).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

LAG_WINDOW_S = 60


class LoopMonitor:
    def __init__(
        self,
        period_s: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
        window_s: int = LAG_WINDOW_S,
    ) -> None:
        self.period_s = period_s
        self.window_s = window_s
        self._clock = clock
        self.started_at = clock()
        self.last_beat = self.started_at
        self.lag_s = 0.0
        self._worst: deque[list[float]] = deque()  # [second, worst lag in it], oldest first

    async def run(self) -> None:
        while True:
            t0 = self._clock()
            await asyncio.sleep(self.period_s)
            self.beat(t0)

    def beat(self, slept_from: float) -> None:
        now = self._clock()
        self.lag_s = max(0.0, now - slept_from - self.period_s)
        self.last_beat = now
        second = float(int(now))
        if self._worst and self._worst[-1][0] == second:
            self._worst[-1][1] = max(self._worst[-1][1], self.lag_s)
        else:
            self._worst.append([second, self.lag_s])
        self._forget(now)

    def _forget(self, now: float) -> None:
        while self._worst and self._worst[0][0] <= now - self.window_s:
            self._worst.popleft()

    @property
    def max_lag_s(self) -> float:
        """The worst lag over the last ``window_s`` seconds."""
        self._forget(self._clock())
        return max((w for _, w in self._worst), default=0.0)

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
            f"Worst event loop lag over the last {self.window_s} seconds (the same for "
            "every scraper).",
        )
        worst.add_metric([], self.max_lag_s)
        yield worst
        age = GaugeMetricFamily(
            "sentinel_event_loop_heartbeat_age_seconds",
            "Seconds since the event loop heartbeat last ran.",
        )
        age.add_metric([], self.heartbeat_age_s())
        yield age
