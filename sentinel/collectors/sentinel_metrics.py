"""``sentinel_*`` series about the engine, built from ``EngineStatus`` at scrape time.

Reads plain attributes only, so a scrape never fails and never waits on the engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from sentinel.state import EngineState, EngineStatus, Lifecycle

# Every restart reason the supervisor and the probes record: each is exported from 0 on,
# so that increase() in an alert sees the first restart (a series born at 1 has no
# increase). A reason not listed here still appears once it happens.
RESTART_REASONS = ("crashed", "stalled", "not_ready", "startup_timeout")


class EngineStatusCollector:
    def __init__(self, status: EngineStatus, clock: Callable[[], float] = time.time) -> None:
        self._status = status
        self._clock = clock

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        st = self._status
        current = st.display_state()  # a drain shows as draining (issue 16)

        state = GaugeMetricFamily(
            "sentinel_engine_state",
            "The engine's state: 1 for the current state, 0 for the others.",
            labels=["state"],
        )
        for s in EngineState:
            state.add_metric([s.value], 1.0 if s == current else 0.0)
        yield state

        yield _gauge(
            "sentinel_engine_up",
            "1 while an engine generation is loaded and running (not starting, restarting, "
            "draining, failed or stopped).",
            1.0 if st.lifecycle == Lifecycle.running else 0.0,
        )
        yield _gauge(
            "sentinel_engine_loaded",
            "1 once the current generation's first real inference succeeded.",
            1.0 if st.loaded_at is not None else 0.0,
        )
        yield _gauge(
            "sentinel_engine_ready",
            "1 while every readiness check passes.",
            1.0 if st.ready else 0.0,
        )
        yield _gauge(
            "sentinel_engine_stalled",
            "1 while requests run and no token moves (see probes.stall_window_s).",
            1.0 if st.stalled_reason else 0.0,
        )
        stream_stalls = CounterMetricFamily(
            "sentinel_engine_stream_stalls",
            "Streams from the local engine that sent nothing mid-stream for "
            "proxy.stream_idle_timeout_s, fed to stall detection.",
        )
        stream_stalls.add_metric([], float(st.stream_stalls))
        yield stream_stalls
        yield _gauge(
            "sentinel_engine_generation",
            "Engine generation number: 1 for the first launch, +1 per restart.",
            float(st.generation),
        )
        if st.generation_started_at is not None:
            yield _gauge(
                "sentinel_engine_generation_start_time_seconds",
                "Unix time the current engine generation was launched.",
                st.generation_started_at,
            )
        if st.loaded_at is not None and st.generation_started_at is not None:
            yield _gauge(
                "sentinel_engine_load_duration_seconds",
                "Seconds from launch to the first successful inference, this generation.",
                max(0.0, st.loaded_at - st.generation_started_at),
            )

        checks = GaugeMetricFamily(
            "sentinel_readiness_check",
            "1 when the readiness check passes, 0 when it fails.",
            labels=["check"],
        )
        for name, check in st.ready_checks.items():
            checks.add_metric([name], 1.0 if check.get("ok") else 0.0)
        yield checks

        restarts = CounterMetricFamily(
            "sentinel_engine_restarts",
            "Engine restarts by reason (crashed, stalled, not_ready, startup_timeout, ...).",
            labels=["reason"],
        )
        counts = {reason: 0 for reason in RESTART_REASONS} | st.restart_counts
        for reason, count in sorted(counts.items()):
            restarts.add_metric([reason], float(count))
        yield restarts

        success = GaugeMetricFamily(
            "sentinel_probe_success", "1 when the probe's last run succeeded.", labels=["probe"]
        )
        duration = GaugeMetricFamily(
            "sentinel_probe_duration_seconds",
            "Duration of the probe's last run.",
            labels=["probe"],
        )
        age = GaugeMetricFamily(
            "sentinel_probe_age_seconds",
            "Seconds since the probe's last run ended.",
            labels=["probe"],
        )
        now = self._clock()
        for name, result in sorted(st.probes.items()):
            success.add_metric([name], 1.0 if result.ok else 0.0)
            if result.latency_s is not None:
                duration.add_metric([name], result.latency_s)
            age.add_metric([name], max(0.0, now - result.at))
        yield success
        yield duration
        yield age

        runs = CounterMetricFamily(
            "sentinel_probe_runs",
            "Probe runs by probe and result (ok, fail).",
            labels=["probe", "result"],
        )
        for name, counts in sorted(st.probe_counts.items()):
            for result_label, count in sorted(counts.items()):
                runs.add_metric([name, result_label], float(count))
        yield runs

        zombies = CounterMetricFamily(
            "sentinel_zombies_reaped", "Exited child processes Sentinel reaped."
        )
        zombies.add_metric([], float(st.zombies_reaped))
        yield zombies
        orphans = CounterMetricFamily(
            "sentinel_orphans_killed", "Leftover engine processes Sentinel killed."
        )
        orphans.add_metric([], float(st.orphans_killed))
        yield orphans


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], value)
    return g
