"""Per-process resources by role: Sentinel itself and every engine process (psutil).

Built at scrape time (like prometheus_client's process collector) from the
processes the supervisor recorded in ``EngineStatus``. A process that is gone,
a zombie, or unreadable is skipped: a scrape never fails because of one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from sentinel.state import EngineStatus

_LABELS = ["role", "pid"]
# a pid reused by another process starts much later than the recorded create_time.
# psutil.Process objects are kept between scrapes (is_running() would build a new one
# each time); the supervisor drops exited processes from EngineStatus promptly.
_CREATE_TIME_SLACK_S = 1.0


class ProcessCollector:
    def __init__(self, status: EngineStatus, self_pid: int | None = None) -> None:
        self._status = status
        self._self_pid = self_pid or os.getpid()
        self._cache: dict[int, psutil.Process] = {}

    def describe(self) -> list[Metric]:
        return []

    def _targets(self) -> list[tuple[str, int, float | None]]:
        out: list[tuple[str, int, float | None]] = [("sentinel", self._self_pid, None)]
        out += [(p.role, p.pid, p.create_time) for p in self._status.processes]
        return out

    def _process(self, pid: int, create_time: float | None) -> psutil.Process | None:
        proc = self._cache.get(pid)
        try:
            if proc is None:
                proc = psutil.Process(pid)
                self._cache[pid] = proc
            # create_time() is read once per Process object, then cached by psutil
            if create_time and abs(proc.create_time() - create_time) > _CREATE_TIME_SLACK_S:
                return None  # the pid now belongs to someone else
        except psutil.Error:
            self._cache.pop(pid, None)
            return None
        return proc  # later reads raise NoSuchProcess once it is gone, which evicts it

    def collect(self) -> Iterator[Metric]:
        rss = GaugeMetricFamily(
            "sentinel_process_resident_memory_bytes",
            "Resident memory of the process.",
            labels=_LABELS,
        )
        vms = GaugeMetricFamily(
            "sentinel_process_virtual_memory_bytes",
            "Virtual memory of the process.",
            labels=_LABELS,
        )
        cpu = CounterMetricFamily(
            "sentinel_process_cpu_seconds",
            "User and system CPU time of the process.",
            labels=_LABELS,
        )
        fds = GaugeMetricFamily(
            "sentinel_process_open_fds", "Open file descriptors of the process.", labels=_LABELS
        )
        threads = GaugeMetricFamily(
            "sentinel_process_threads", "Threads of the process.", labels=_LABELS
        )
        start = GaugeMetricFamily(
            "sentinel_process_start_time_seconds", "Unix time the process started.", labels=_LABELS
        )
        live: set[int] = set()
        for role, pid, create_time in self._targets():
            proc = self._process(pid, create_time)
            if proc is None:
                continue
            try:
                with proc.oneshot():
                    mem = proc.memory_info()
                    times = proc.cpu_times()
                    n_threads = proc.num_threads()
                    n_fds = proc.num_fds()
                    started = proc.create_time()
            except psutil.Error:
                self._cache.pop(pid, None)
                continue
            live.add(pid)
            labels = [role, str(pid)]
            rss.add_metric(labels, float(mem.rss))
            vms.add_metric(labels, float(mem.vms))
            cpu.add_metric(labels, float(times.user + times.system))
            fds.add_metric(labels, float(n_fds))
            threads.add_metric(labels, float(n_threads))
            start.add_metric(labels, started)
        for pid in [p for p in self._cache if p not in live]:
            del self._cache[pid]
        yield from (rss, vms, cpu, fds, threads, start)
