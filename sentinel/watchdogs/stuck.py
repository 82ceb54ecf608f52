"""Stuck-engine watchdog: what triggers a capture of every engine process.

- CPU busy, GPU idle: a process using ``cpu_busy_ratio`` of a core while the GPU
  where it holds memory is below ``gpu_idle_ratio`` utilisation, for ``for_s``
  seconds. Off without GPU telemetry unless ``cpu_only`` (then "idle" means no
  request running: the engine's ``vllm:num_requests_running`` is 0).
- The probes' stall (``EngineStatus.stalled_reason``).
- A loaded engine that stays not ready for ``for_s`` seconds.
Each episode captures once (the capture itself is rate-limited); for the CPU rule
``policy: restart`` then replaces the engine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import psutil

from sentinel.config.schema import StuckWatchdogConfig, WatchdogPolicy
from sentinel.logs import get_logger
from sentinel.state import EngineStatus, Lifecycle
from sentinel.watchdogs.metrics import WatchdogMetrics

log = get_logger("sentinel.watchdogs")

RUNNING = "vllm:num_requests_running"
CaptureFn = Callable[[str, str], Awaitable[object]]
# pid -> (GPU utilisation 0..1 of the GPU(s) where it holds memory), or None: no telemetry
GpuIdle = Callable[[], dict[int, float] | None]


@dataclass
class _Proc:
    proc: psutil.Process
    role: str
    cpu: float
    at: float
    busy_since: float | None = None
    fired: bool = False


class StuckWatch:
    def __init__(
        self,
        cfg: StuckWatchdogConfig,
        status: EngineStatus,
        metrics: WatchdogMetrics,
        capture: CaptureFn,
        *,
        gpu_util: GpuIdle | None = None,
        request_restart: Callable[[str, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.status = status
        self.metrics = metrics
        self.capture = capture
        self.gpu_util = gpu_util
        self.request_restart = request_restart
        self._clock = clock
        self._procs: dict[int, _Proc] = {}
        self._stall_key: tuple[int, str] | None = None
        self._not_ready_since: float | None = None
        self._not_ready_fired: int | None = None
        self.last_trigger: dict[str, Any] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def _fire(self, reason: str, detail: str, then: Callable[[], None] | None = None) -> None:
        """Capture in the background (then run ``then``: the policy, after the dump)."""
        self.last_trigger = {"reason": reason, "detail": detail, "at": time.time()}

        async def go() -> None:
            try:
                await self.capture(reason, detail)
            finally:
                if then is not None:
                    then()

        task = asyncio.get_running_loop().create_task(go())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def check(self) -> None:
        now = self._clock()
        st = self.status
        if self.cfg.capture_on_stall:
            reason = st.stalled_reason
            key = (st.generation, reason) if reason else None
            if key is not None and key != self._stall_key:
                self._fire("stalled", reason or "")
            self._stall_key = key
        if self.cfg.capture_on_not_ready:
            self._check_not_ready(now)
        self._check_cpu(now)

    def _check_not_ready(self, now: float) -> None:
        st = self.status
        if st.lifecycle == Lifecycle.running and st.loaded and not st.ready:
            if self._not_ready_since is None:
                self._not_ready_since = now
            elif (
                now - self._not_ready_since >= self.cfg.for_s
                and self._not_ready_fired != st.generation
            ):
                self._not_ready_fired = st.generation
                failed = [
                    f"{k}: {c.get('detail')}" for k, c in st.ready_checks.items() if not c.get("ok")
                ]
                self._fire("not_ready", "; ".join(failed))
        else:
            self._not_ready_since = None
            if st.ready:
                self._not_ready_fired = None

    def _idle(self) -> dict[int, float] | None:
        """pid -> GPU utilisation, or None when the rule cannot run."""
        if self.gpu_util is not None:
            util = self.gpu_util()
            if util is not None:
                return util
        if self.cfg.cpu_only:
            running = self.status.engine_metrics.get(RUNNING)
            if running is None:
                return None
            load = 0.0 if running <= 0 else 1.0
            return {p.pid: load for p in self.status.processes}
        return None

    def _check_cpu(self, now: float) -> None:
        live = {p.pid: p.role for p in self.status.processes}
        for pid in [p for p in self._procs if p not in live]:
            del self._procs[pid]
        util = self._idle() if self.cfg.enabled else None
        stuck_roles: set[str] = set()
        for pid, role in live.items():
            entry = self._procs.get(pid)
            try:
                if entry is None:
                    proc = psutil.Process(pid)
                    t = proc.cpu_times()
                    self._procs[pid] = _Proc(proc, role, t.user + t.system, now)
                    continue
                t = entry.proc.cpu_times()
            except psutil.Error:
                self._procs.pop(pid, None)
                continue
            cpu = t.user + t.system
            dt = now - entry.at
            ratio = (cpu - entry.cpu) / dt if dt > 0 else 0.0
            entry.cpu, entry.at = cpu, now
            gpu = None if util is None else util.get(pid)
            busy_idle = (
                gpu is not None
                and ratio >= self.cfg.cpu_busy_ratio
                and gpu <= self.cfg.gpu_idle_ratio
            )
            if not busy_idle:
                entry.busy_since, entry.fired = None, False
                continue
            if entry.busy_since is None:
                entry.busy_since = now
            if now - entry.busy_since >= self.cfg.for_s:
                stuck_roles.add(role)
                if not entry.fired:
                    entry.fired = True
                    self._stuck(role, pid, ratio, gpu)
        for role in ("api_server", "engine_core", "worker"):
            self.metrics.stuck.labels(role).set(1.0 if role in stuck_roles else 0.0)

    def _stuck(self, role: str, pid: int, ratio: float, gpu: float | None) -> None:
        what = (
            "GPU utilisation"
            if self.gpu_util is not None and not self.cfg.cpu_only
            else ("requests running")
        )
        detail = (
            f"{role} pid {pid} used {ratio:.0%} of a core while idle "
            f"({what} {gpu:g}) for {self.cfg.for_s:g}s"
        )
        log.error("stuck engine process: busy CPU, idle GPU", role=role, pid=pid, detail=detail)
        then = None
        if self.cfg.policy == WatchdogPolicy.restart and self.request_restart is not None:
            restart = self.request_restart

            def then() -> None:
                restart("stuck", detail)

        self._fire("cpu_busy_gpu_idle", detail, then)

    def describe(self) -> dict[str, Any]:
        return {
            "policy": self.cfg.policy.value,
            "cpu_rule": (
                "gpu" if self.gpu_util is not None else "cpu_only" if self.cfg.cpu_only else "off"
            ),
            "last_trigger": self.last_trigger,
            "busy": [
                {"pid": pid, "role": p.role, "busy_for_s": round(self._clock() - p.busy_since, 1)}
                for pid, p in self._procs.items()
                if p.busy_since is not None
            ],
        }
