"""GC watchdog: the agents' reports (unix datagrams) and Sentinel's own collections.

Every engine process's agent sends a JSON datagram each ``report_interval_s``: its
pauses ``[generation, seconds, collected]``, counts and tracked objects. Pauses go
into ``sentinel_gc_pause_seconds{role}``; one longer than ``watchdogs.gc.pause_limit_s``
is logged with role, pid, generation and duration, and counted. Roles come from
the supervisor's process list (the agent's own hint only for a process not listed
yet, restricted to the known roles), so a sender cannot invent label values.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sentinel.config.schema import WatchdogsConfig
from sentinel.logs import get_logger
from sentinel.watchdogs.metrics import WatchdogMetrics

log = get_logger("sentinel.watchdogs")

ROLES = ("api_server", "engine_core", "worker", "other")
MAX_DATAGRAM = 256 * 1024
RCVBUF = 4 * 1024 * 1024


@dataclass
class AgentSeen:
    pid: int
    role: str
    first_at: float
    last_at: float
    reports: int = 0
    pauses: int = 0
    max_pause_s: float = 0.0
    over_limit: int = 0
    tracked: int | None = None
    frozen: int | None = None
    threshold: list[int] = field(default_factory=list)
    disabled: str | None = None


class GcWatch:
    def __init__(
        self,
        cfg: WatchdogsConfig,
        metrics: WatchdogMetrics,
        roles: Callable[[], dict[int, str]],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.roles = roles
        self._clock = clock
        self.limit = cfg.gc.pause_limit_s
        self.seen: dict[int, AgentSeen] = {}
        self._dir: str | None = None
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._own: list[tuple[int, float, int]] = []
        self._own_t0: float | None = None
        self.dropped: dict[str, int] = {}

    # ---- the channel -----------------------------------------------------------
    @property
    def socket_path(self) -> str | None:
        return None if self._dir is None else os.path.join(self._dir, "agent.sock")

    def open(self) -> str:
        """Bind the datagram socket in a private (0700) temporary directory."""
        self._dir = tempfile.mkdtemp(prefix="sentinel-agent-")
        path = self.socket_path
        assert path is not None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        sock.bind(path)
        sock.setblocking(False)
        self._sock = sock
        return path

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._sock is None:
            self.open()
        assert self._sock is not None
        self._loop = loop
        loop.add_reader(self._sock.fileno(), self._readable)
        gc.callbacks.append(self._on_own_gc)

    def close(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._on_own_gc)
        if self._sock is not None:
            if self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _readable(self) -> None:
        t0 = time.thread_time()
        try:
            self._read_all()
        finally:
            self.metrics.watchdog_cpu.labels("gc").inc(max(0.0, time.thread_time() - t0))

    def _read_all(self) -> None:
        assert self._sock is not None
        for _ in range(1000):
            try:
                data = self._sock.recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("agent socket read failed", error=str(exc))
                return
            self.handle(data)

    # ---- reports ----------------------------------------------------------------
    def _drop(self, why: str) -> None:
        self.dropped[why] = self.dropped.get(why, 0) + 1
        self.metrics.agent_dropped.labels(why).inc()

    def handle(self, data: bytes) -> None:
        try:
            msg = json.loads(data)
            pid = int(msg["pid"])
            kind = str(msg["t"])
        except (ValueError, KeyError, TypeError, RecursionError):
            self._drop("malformed")
            return
        now = self._clock()
        role = self.roles().get(pid)
        if role is None:
            hint = msg.get("hint")
            role = hint if hint in ROLES else "other"
        agent = self.seen.get(pid)
        if agent is None:
            agent = self.seen[pid] = AgentSeen(pid, role, now, now)
        agent.role, agent.last_at = role, now
        if kind == "disabled":
            err = str(msg.get("error", ""))[:500]
            if agent.disabled is None:
                agent.disabled = err
                log.warning(
                    "watchdog agent disabled itself in an engine process; the engine runs on",
                    role=role,
                    pid=pid,
                    error=err,
                )
            return
        if kind != "report":
            return
        try:
            self._report(agent, msg)
        except (ValueError, TypeError, IndexError):
            self._drop("malformed")

    def _report(self, agent: AgentSeen, msg: dict[str, Any]) -> None:
        agent.reports += 1
        pauses = msg.get("pauses") or []
        for entry in pauses:
            gen, seconds, collected = int(entry[0]), float(entry[1]), int(entry[2])
            if not (0 <= gen <= 2) or not (0.0 <= seconds < 3600.0):
                raise ValueError("pause out of range")
            self._pause(agent.role, agent.pid, gen, seconds, collected)
            agent.pauses += 1
            agent.max_pause_s = max(agent.max_pause_s, seconds)
            if seconds > self.limit:
                agent.over_limit += 1
        dropped = int(msg.get("dropped") or 0)
        if dropped > 0:
            self.dropped["agent_overflow"] = self.dropped.get("agent_overflow", 0) + dropped
            self.metrics.agent_dropped.labels("agent_overflow").inc(dropped)
        tracked = msg.get("tracked")
        if isinstance(tracked, int):
            agent.tracked = tracked
        frozen = msg.get("frozen")
        if isinstance(frozen, int):
            agent.frozen = frozen
        thr = msg.get("threshold")
        if isinstance(thr, list):
            agent.threshold = [int(x) for x in thr[:3]]

    def _pause(self, role: str, pid: int, gen: int, seconds: float, collected: int) -> None:
        self.metrics.gc_pause.labels(role, str(gen)).observe(seconds)
        if collected > 0:
            self.metrics.gc_collected.labels(role).inc(collected)
        if seconds > self.limit:
            self.metrics.gc_over_limit.labels(role).inc()
            log.warning(
                "garbage-collector pause over the limit (watchdogs.gc.pause_limit_s)",
                role=role,
                pid=pid,
                gc_generation=gen,
                seconds=round(seconds, 4),
                limit_s=self.limit,
            )

    # ---- Sentinel's own collections ---------------------------------------------
    def _on_own_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._own_t0 = time.perf_counter()
            return
        t0, self._own_t0 = self._own_t0, None
        if t0 is not None and len(self._own) < 10_000:
            self._own.append((info["generation"], time.perf_counter() - t0, info["collected"]))

    def tick(self) -> None:
        """Flush Sentinel's own pauses; refresh ``sentinel_watchdog_agent_up``."""
        own, self._own = self._own, []
        for gen, seconds, collected in own:
            self._pause("sentinel", os.getpid(), gen, seconds, collected)
        now = self._clock()
        stale_after = 3 * self.cfg.agent.report_interval_s + 2.0
        roles = self.roles()
        up: dict[str, bool] = {}
        for pid, role in roles.items():
            agent = self.seen.get(pid)
            ok = agent is not None and agent.disabled is None and now - agent.last_at < stale_after
            up[role] = up.get(role, True) and ok
        for role in ROLES:
            if role in up:
                self.metrics.agent_up.labels(role).set(1.0 if up[role] else 0.0)
            elif role != "other":
                self.metrics.agent_up.labels(role).set(0.0)
        for pid in [p for p, a in self.seen.items() if p not in roles and now - a.last_at > 60]:
            del self.seen[pid]
        tracked: dict[str, int] = {}
        for pid, role in roles.items():
            agent = self.seen.get(pid)
            if agent is not None and agent.tracked is not None:
                tracked[role] = max(tracked.get(role, 0), agent.tracked)
        for role, n in tracked.items():
            self.metrics.gc_tracked.labels(role).set(n)

    def describe(self) -> dict[str, Any]:
        now = self._clock()
        return {
            "socket": self.socket_path,
            "pause_limit_s": self.limit,
            "dropped": dict(self.dropped),
            "processes": [
                {
                    "pid": a.pid,
                    "role": a.role,
                    "last_report_age_s": round(now - a.last_at, 1),
                    "reports": a.reports,
                    "pauses": a.pauses,
                    "max_pause_s": round(a.max_pause_s, 4),
                    "over_limit": a.over_limit,
                    "tracked_objects": a.tracked,
                    "frozen_objects": a.frozen,
                    "gc_threshold": a.threshold,
                    "disabled": a.disabled,
                }
                for a in sorted(self.seen.values(), key=lambda a: a.pid)
            ],
        }
