"""The watchdogs and incident captures of one Sentinel, wired (built by app.py).

Gives the app: background tasks, the agent's injection into the engine's
environment, ``capture_for_hang`` (the supervisor's hook before a restart for a
hang), on-demand ``dump`` and ``snapshot`` (the admin API), and a /status section.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from sentinel import agent
from sentinel.config import SentinelConfig
from sentinel.incidents.capture import Capture, Capturer, Target
from sentinel.incidents.pyspy import PySpy
from sentinel.incidents.snapshot import SnapshotBuilder
from sentinel.incidents.store import IncidentStore
from sentinel.logs import get_logger
from sentinel.state import EngineStatus
from sentinel.watchdogs.gcwatch import GcWatch
from sentinel.watchdogs.leak import LeakWatch
from sentinel.watchdogs.metrics import WatchdogMetrics
from sentinel.watchdogs.stuck import StuckWatch

log = get_logger("sentinel.watchdogs")

GC_TICK_S = 1.0


class Watchdogs:
    def __init__(
        self,
        cfg: SentinelConfig,
        status: EngineStatus,
        registry: CollectorRegistry | None,
        *,
        request_restart: Callable[[str, str], None],
        gpu_snapshot: Callable[[], Any] | None = None,
        status_doc: Callable[[], dict[str, Any]] = dict,
        metrics_text: Callable[[], bytes] = bytes,
        engine_log: Callable[[], Sequence[str]] = list,
        sentinel_log: Callable[[], Sequence[str]] = list,
        extra_secrets: Callable[[], Iterable[str]] = tuple,
    ) -> None:
        self.cfg = cfg
        self.status = status
        self.gpu_snapshot = gpu_snapshot
        wcfg = cfg.watchdogs
        self.metrics = WatchdogMetrics(registry)
        self.store = IncidentStore(cfg.incidents)
        self.pyspy = PySpy(wcfg.dump)
        self.capturer = Capturer(
            self.pyspy,
            self.store,
            self.metrics,
            self.targets,
            min_interval_s=wcfg.dump.min_interval_s,
        )
        self.gc = GcWatch(wcfg, self.metrics, self.roles)
        self.leak = LeakWatch(
            wcfg.leak,
            self.metrics,
            self._leak_processes,
            gpu_memory=self._gpu_memory if gpu_snapshot is not None else None,
            engine_metrics=lambda: status.engine_metrics,
            request_restart=request_restart,
        )
        self.stuck = StuckWatch(
            wcfg.stuck,
            status,
            self.metrics,
            self._auto_capture,
            gpu_util=self._gpu_util if gpu_snapshot is not None else None,
            request_restart=request_restart,
        )
        self.snapshots = SnapshotBuilder(
            cfg,
            self.store,
            status=status_doc,
            metrics=metrics_text,
            engine_log=engine_log,
            sentinel_log=sentinel_log,
            restarts=self._restarts,
            gpu=gpu_snapshot,
            extra_secrets=extra_secrets,
        )
        self.last_snapshot: dict[str, Any] | None = None

    # ---- what the engine is made of ----------------------------------------------
    def targets(self) -> list[Target]:
        return [Target(p.pid, p.role) for p in self.status.processes]

    def roles(self) -> dict[int, str]:
        return {p.pid: p.role for p in self.status.processes}

    def _leak_processes(self) -> list[tuple[int, str, float]]:
        # loading a model is growth by design: trends start once the generation is loaded
        if not self.status.loaded:
            return []
        return [(p.pid, p.role, p.create_time) for p in self.status.processes]

    def _gpu_memory(self) -> tuple[dict[int, int], int, int]:
        snap = self.gpu_snapshot() if self.gpu_snapshot else None
        by_pid: dict[int, int] = {}
        total = used = 0
        if snap is None or not getattr(snap, "available", False):
            return by_pid, 0, 0
        for dev in snap.devices:
            mine = [p for p in (dev.processes or ()) if p.role]
            for p in mine:
                by_pid[p.pid] = by_pid.get(p.pid, 0) + p.used_bytes
            if mine and dev.memory_total_bytes:
                total += dev.memory_total_bytes
                used += dev.memory_used_bytes or 0
        return by_pid, total, used

    def _gpu_util(self) -> dict[int, float] | None:
        snap = self.gpu_snapshot() if self.gpu_snapshot else None
        if snap is None or not getattr(snap, "available", False):
            return None
        util: dict[int, float] = {}
        for dev in snap.devices:
            if dev.sm_utilization_ratio is None:
                continue
            for p in dev.processes or ():
                util[p.pid] = max(util.get(p.pid, 0.0), dev.sm_utilization_ratio)
        return util

    def _restarts(self) -> dict[str, Any]:
        st = self.status
        return {
            "restarts": [asdict(r) for r in st.restarts],
            "restart_counts": dict(st.restart_counts),
            "last_exit": asdict(st.last_exit) if st.last_exit else None,
            "generation": st.generation,
        }

    def restart_leaks_through(self, graceful: Callable[[], Awaitable[object]]) -> None:
        """Replace the engine for a leak with a drain (issue 16's ``sentinel restart``:
        requests in flight finish, traffic waits or goes to the next tier) instead of a
        plain supervisor restart."""

        def restart(reason: str, detail: str) -> None:
            log.warning("restarting the engine through a drain", reason=reason, detail=detail)
            task = asyncio.get_running_loop().create_task(graceful())
            task.add_done_callback(_report_graceful)

        self.leak.request_restart = restart

    # ---- lifecycle -------------------------------------------------------------------
    def extend_engine_env(self, env: dict[str, str]) -> None:
        """Supervisor hook: give every engine Python process the agent."""
        path = self.gc.socket_path
        if path is not None:
            agent.inject(env, self.cfg.watchdogs.agent, path)

    def open(self) -> None:
        """Bind the agent's socket (before the first launch)."""
        if self.cfg.watchdogs.agent.enabled:
            try:
                self.gc.open()
            except OSError as exc:
                log.error(
                    "watchdog agent socket unavailable; engines run without the agent",
                    error=str(exc),
                )

    def tasks(self) -> list[tuple[Coroutine[Any, Any, None], str]]:
        out = [(self._gc_loop(), "watchdog-gc"), (self._check_ptrace(), "watchdog-ptrace")]
        if self.cfg.watchdogs.leak.enabled:
            out.append((self._leak_loop(), "watchdog-leak"))
        out.append((self._stuck_loop(), "watchdog-stuck"))
        return out

    def _spent(self, watchdog: str, since: float) -> None:
        """CPU of Sentinel's loop thread spent in one watchdog (sentinel_watchdog_cpu_seconds)."""
        self.metrics.watchdog_cpu.labels(watchdog).inc(max(0.0, time.thread_time() - since))

    async def _leak_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.watchdogs.leak.interval_s)
            t0 = time.thread_time()
            self.leak.sample()
            self._spent("leak", t0)

    async def _stuck_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.watchdogs.stuck.interval_s)
            t0 = time.thread_time()
            await self.stuck.check()
            self._spent("stuck", t0)

    def close(self) -> None:
        self.gc.close()

    async def _gc_loop(self) -> None:
        self.gc.start(asyncio.get_running_loop())
        try:
            while True:
                await asyncio.sleep(GC_TICK_S)
                t0 = time.thread_time()
                self.gc.tick()
                self._spent("gc", t0)
        finally:
            self.gc.close()

    async def _check_ptrace(self) -> None:
        ok, detail = await self.pyspy.check_permission()
        (log.info if ok else log.warning)(
            "stack dumps " + ("available" if ok else "unavailable"),
            py_spy=self.pyspy.executable,
            detail=detail,
        )

    # ---- captures ------------------------------------------------------------------
    async def _auto_capture(self, reason: str, detail: str) -> Capture | None:
        return await self.capturer.capture(reason, detail, automatic=True)

    async def dump(
        self, *, role: str | None = None, pid: int | None = None, native: bool | None = None
    ) -> Capture:
        cap = await self.capturer.capture(
            "operator", "", automatic=False, role=role, pid=pid, native=native
        )
        assert cap is not None
        return cap

    async def snapshot(self, reason: str = "operator", capture: Capture | None = None) -> Path:
        why = ""
        if capture is None:
            cap = await self.capturer.capture(reason, "snapshot", automatic=False, save=False)
            capture = cap
        if capture is not None and not capture.results:
            why = "; ".join(capture.errors) or "no engine process"
        path = await asyncio.to_thread(self.snapshots.build, reason, capture, why)
        self.last_snapshot = {"path": str(path), "reason": reason, "at": time.time()}
        log.warning("snapshot saved", reason=reason, path=str(path))
        return path

    async def capture_for_hang(self, reason: str, detail: str) -> None:
        """Before a restart for a hang: dumps of every engine process, then a snapshot.
        The caller bounds it (supervisor.evidence_timeout_s)."""
        t0 = time.monotonic()
        cap = await self.capturer.capture(f"hang_{reason}", detail, automatic=False)
        try:
            await self.snapshot(f"hang_{reason}", cap)
        except OSError as exc:
            log.error("snapshot before the restart failed", error=str(exc))
        log.info(
            "evidence preserved before a restart for a hang",
            reason=reason,
            seconds=round(time.monotonic() - t0, 3),
            dumps=str(cap.path) if cap and cap.path else None,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "dumps": {
                **self.pyspy.describe(),
                "last": self.capturer.last.record() if self.capturer.last else None,
            },
            "incidents": self.store.summary(),
            "last_snapshot": self.last_snapshot,
            "gc": self.gc.describe(),
            "leak": self.leak.describe(),
            "stuck": self.stuck.describe(),
        }


def _report_graceful(task: asyncio.Task[object]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("restart through a drain failed", error=f"{type(exc).__name__}: {exc}")
