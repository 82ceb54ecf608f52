"""Leak watchdog: per engine process RSS, open files, threads and GPU memory over time.

Every ``interval_s`` each engine process is sampled; a Theil-Sen slope over the last
``window_s`` gives its growth rate, and the headroom (cgroup limit, else host memory;
the GPU's memory for GPU memory) divided by it the predicted time to the limit. A
process growing faster than ``growth_limit_bytes_per_hour``, or predicted to reach
its limit within ``time_to_limit_limit_s``, is `leaking`: logged, in /status and
metrics; with ``policy: restart`` the engine is replaced at a quiet moment.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

from sentinel.config.schema import LeakWatchdogConfig, WatchdogPolicy
from sentinel.logs import get_logger
from sentinel.watchdogs.metrics import WatchdogMetrics
from sentinel.watchdogs.trend import format_duration, memory_headroom, theil_sen

log = get_logger("sentinel.watchdogs")

RUNNING = "vllm:num_requests_running"
Headroom = Callable[[], tuple[int, int, str]]


@dataclass
class Series:
    pid: int
    role: str
    create_time: float
    proc: psutil.Process
    samples: deque[tuple[float, int, int, int, int | None]] = field(default_factory=deque)
    # (t, rss, fds, threads, gpu bytes)
    leaking: bool = False


@dataclass
class Trend:
    pid: int
    role: str
    samples: int
    rss_bytes: int
    rss_bytes_per_s: float | None
    time_to_limit_s: float | None
    fds_per_hour: float | None
    threads_per_hour: float | None
    gpu_bytes: int | None
    gpu_bytes_per_s: float | None
    gpu_time_to_limit_s: float | None
    leaking: bool
    why: str = ""

    def doc(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "role": self.role,
            "samples": self.samples,
            "rss_bytes": self.rss_bytes,
            "rss_growth_bytes_per_hour": _per_hour(self.rss_bytes_per_s),
            "time_to_limit_s": self.time_to_limit_s,
            "time_to_limit": _fmt(self.time_to_limit_s),
            "open_files_growth_per_hour": _round(self.fds_per_hour),
            "threads_growth_per_hour": _round(self.threads_per_hour),
            "gpu_bytes": self.gpu_bytes,
            "gpu_growth_bytes_per_hour": _per_hour(self.gpu_bytes_per_s),
            "gpu_time_to_limit_s": self.gpu_time_to_limit_s,
            "leaking": self.leaking,
            "why": self.why,
        }


def _per_hour(rate: float | None) -> float | None:
    return None if rate is None else round(rate * 3600.0)


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 2)


def _fmt(v: float | None) -> str | None:
    return None if v is None else format_duration(v)


class LeakWatch:
    def __init__(
        self,
        cfg: LeakWatchdogConfig,
        metrics: WatchdogMetrics,
        processes: Callable[[], list[tuple[int, str, float]]],
        *,
        gpu_memory: Callable[[], tuple[dict[int, int], int, int]] | None = None,
        engine_metrics: Callable[[], dict[str, float]] = dict,
        request_restart: Callable[[str, str], None] | None = None,
        headroom: Headroom = memory_headroom,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.processes = processes  # (pid, role, create_time) of the current generation
        self.gpu_memory = gpu_memory  # ({pid: bytes}, gpu total, gpu used) or None
        self.engine_metrics = engine_metrics
        self.request_restart = request_restart
        self.headroom = headroom
        self._clock = clock
        self.series: dict[int, Series] = {}
        self.trends: list[Trend] = []
        self.restart_planned_at: float | None = None
        self.restart_why = ""

    def sample(self) -> list[Trend]:
        now = self._clock()
        live = {pid: (role, ct) for pid, role, ct in self.processes()}
        for pid in [p for p in self.series if p not in live]:
            del self.series[pid]
        gpu_by_pid: dict[int, int] = {}
        gpu_total = gpu_used = 0
        if self.gpu_memory is not None:
            gpu_by_pid, gpu_total, gpu_used = self.gpu_memory()
        for pid, (role, ct) in live.items():
            s = self.series.get(pid)
            if s is None or abs(s.create_time - ct) > 1.0:
                try:
                    s = self.series[pid] = Series(pid, role, ct, psutil.Process(pid))
                except psutil.Error:
                    continue
            try:
                with s.proc.oneshot():
                    rss = s.proc.memory_info().rss
                    fds = s.proc.num_fds()
                    threads = s.proc.num_threads()
            except psutil.Error:
                self.series.pop(pid, None)
                continue
            s.samples.append((now, rss, fds, threads, gpu_by_pid.get(pid)))
            while s.samples and now - s.samples[0][0] > self.cfg.window_s:
                s.samples.popleft()
        limit, left, source = self.headroom()
        self.trends = [
            self._trend(s, left, source, gpu_total, gpu_used) for s in self.series.values()
        ]
        self._export()
        self._policy(now)
        return self.trends

    def _trend(self, s: Series, left: int, source: str, gpu_total: int, gpu_used: int) -> Trend:
        pts = list(s.samples)
        enough = len(pts) >= self.cfg.min_samples
        rate = theil_sen([(p[0], p[1]) for p in pts]) if enough else None
        fds = theil_sen([(p[0], p[2]) for p in pts]) if enough else None
        threads = theil_sen([(p[0], p[3]) for p in pts]) if enough else None
        gpu_pts = [(p[0], p[4]) for p in pts if p[4] is not None]
        gpu_rate = theil_sen(gpu_pts) if len(gpu_pts) >= self.cfg.min_samples else None
        ttl = None if rate is None else (left / rate if rate > 0 else math.inf)
        gpu_ttl = None
        if gpu_rate is not None and gpu_total:
            gpu_ttl = max(0, gpu_total - gpu_used) / gpu_rate if gpu_rate > 0 else math.inf
        why = []
        limit_rate = self.cfg.growth_limit_bytes_per_hour / 3600.0
        if rate is not None and rate > limit_rate:
            why.append(f"RSS grows {format_bytes(rate * 3600)}/h")
        if ttl is not None and ttl < self.cfg.time_to_limit_limit_s:
            why.append(f"{source} memory limit reached in {format_duration(ttl)}")
        if gpu_rate is not None and gpu_rate > limit_rate:
            why.append(f"GPU memory grows {format_bytes(gpu_rate * 3600)}/h")
        if gpu_ttl is not None and gpu_ttl < self.cfg.time_to_limit_limit_s:
            why.append(f"GPU memory full in {format_duration(gpu_ttl)}")
        leaking = bool(why)
        trend = Trend(
            s.pid,
            s.role,
            len(pts),
            pts[-1][1] if pts else 0,
            rate,
            ttl,
            None if fds is None else fds * 3600,
            None if threads is None else threads * 3600,
            pts[-1][4] if pts else None,
            gpu_rate,
            gpu_ttl,
            leaking,
            "; ".join(why),
        )
        if leaking != s.leaking:
            s.leaking = leaking
            if leaking:
                log.warning(
                    "memory growth: process predicted to reach its limit",
                    role=s.role,
                    pid=s.pid,
                    growth_bytes_per_hour=_per_hour(rate),
                    time_to_limit=_fmt(ttl),
                    time_to_limit_s=None if ttl is None else round(ttl),
                    why=trend.why,
                    policy=self.cfg.policy.value,
                )
            else:
                log.info("memory growth ended", role=s.role, pid=s.pid)
        return trend

    def _export(self) -> None:
        by_role: dict[str, list[Trend]] = {}
        for t in self.trends:
            by_role.setdefault(t.role, []).append(t)
        for role in ("api_server", "engine_core", "worker"):
            trends = by_role.get(role, [])
            rates = [t for t in trends if t.rss_bytes_per_s is not None]
            if rates:
                worst = max(rates, key=lambda t: t.rss_bytes_per_s or 0.0)
                self.metrics.mem_growth.labels(role).set(worst.rss_bytes_per_s or 0.0)
                self.metrics.mem_ttl.labels(role).set(
                    min(t.time_to_limit_s for t in rates if t.time_to_limit_s is not None)
                )
            else:
                _remove(self.metrics.mem_growth, role)
                _remove(self.metrics.mem_ttl, role)
            gpu = [t for t in trends if t.gpu_bytes_per_s is not None]
            if gpu:
                self.metrics.gpu_mem_growth.labels(role).set(
                    max(t.gpu_bytes_per_s or 0.0 for t in gpu)
                )
                self.metrics.gpu_mem_ttl.labels(role).set(
                    min(t.gpu_time_to_limit_s or math.inf for t in gpu)
                )
            self.metrics.leak_suspected.labels(role).set(
                1.0 if any(t.leaking for t in trends) else 0.0
            )

    def _policy(self, now: float) -> None:
        leaking = [t for t in self.trends if t.leaking]
        if self.cfg.policy != WatchdogPolicy.restart or self.request_restart is None:
            return
        if not leaking:
            self.restart_planned_at = None
            return
        if self.restart_planned_at is None:
            self.restart_planned_at = now
            self.restart_why = "; ".join(f"{t.role} pid {t.pid}: {t.why}" for t in leaking)
            log.warning(
                "engine restart planned at a quiet moment (watchdogs.leak.policy: restart)",
                why=self.restart_why,
                max_wait_s=self.cfg.quiet_max_wait_s,
            )
        running = self.engine_metrics().get(RUNNING)
        quiet = running is not None and running <= self.cfg.quiet_max_running
        waited = now - self.restart_planned_at
        if quiet or waited >= self.cfg.quiet_max_wait_s:
            detail = self.restart_why + (
                "" if quiet else f" (no quiet moment within {self.cfg.quiet_max_wait_s:g}s)"
            )
            self.restart_planned_at = None
            self.series.clear()
            self.request_restart("leak", detail)

    def describe(self) -> dict[str, Any]:
        return {
            "policy": self.cfg.policy.value,
            "window_s": self.cfg.window_s,
            "restart_planned": self.restart_planned_at is not None,
            "processes": [t.doc() for t in self.trends],
        }


def _remove(gauge: Any, role: str) -> None:
    try:
        gauge.remove(role)
    except KeyError:
        pass


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
