"""The engine's observed state: one object, written by the supervisor, probes and
collectors, read by the ops endpoints, metrics and the proxy.

Flow: engine process -> supervisor / probes / collectors -> ``EngineStatus`` ->
metrics, /status, /readyz, and the proxy's routing decisions.

Writers on the event loop call methods directly; the GPU poller thread uses
``set_degraded``/``clear_degraded``, which take the lock. Readers get plain
snapshots (``snapshot()``), never live internals.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class Lifecycle(StrEnum):
    """What the supervisor is doing with the engine process tree."""

    starting = "starting"  # a generation was launched; model not yet loaded
    running = "running"  # the generation's first real inference succeeded
    restarting = "restarting"  # between generations (cleanup, backoff)
    draining = "draining"  # stopping: no new traffic, in-flight work finishing
    failed = "failed"  # crash loop or unrecoverable start-up error; not restarting
    stopped = "stopped"  # Sentinel is shutting down / engine not running


class EngineState(StrEnum):
    """The state a person or a router sees (``/status``, ``sentinel_engine_state``)."""

    starting = "starting"
    ready = "ready"
    degraded = "degraded"
    stalled = "stalled"
    restarting = "restarting"
    draining = "draining"
    failed = "failed"
    stopped = "stopped"
    unkillable = "unkillable"  # an engine process survived SIGKILL (issue 16)


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    role: str  # api_server | engine_core | worker | other
    generation: int
    create_time: float


@dataclass(frozen=True)
class ExitInfo:
    generation: int
    pid: int
    returncode: int | None  # exit status when it exited
    signal: int | None  # signal number when a signal ended it
    at: float
    cause: str  # human-readable explanation (diagnosis of the log tail)
    reason: str  # short machine label: crashed, killed, port_in_use, model_not_found, ...
    log_tail: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RestartRecord:
    at: float
    generation: int  # the generation that was replaced
    reason: str  # crashed | stalled | not_ready | startup_timeout | sighup | ...
    detail: str = ""


@dataclass(frozen=True)
class ProbeResult:
    name: str
    ok: bool
    at: float
    latency_s: float | None
    detail: str = ""


@dataclass(frozen=True)
class DrainInfo:
    """A drain in progress: no new traffic for the local engine (issue 16)."""

    reason: str  # sigterm | preemption | admin | restart
    since: float
    fallback: bool  # new requests go to the next tier (else 503 + Retry-After)
    by_hand: bool  # asked for through the admin API; ended by `sentinel resume`


Listener = Callable[["EngineStatus"], None]


class EngineStatus:
    """Observed engine state. Not a singleton: the app builds one and passes it on."""

    def __init__(self, max_history: int = 50, clock: Callable[[], float] = time.time) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self.lifecycle: Lifecycle = Lifecycle.stopped
        self.lifecycle_since: float = clock()
        self.generation: int = 0
        self.generation_started_at: float | None = None
        self.loaded_at: float | None = None  # first successful inference of this generation
        self.processes: list[ProcessInfo] = []
        self.restarts: deque[RestartRecord] = deque(maxlen=max_history)
        self.restart_counts: dict[str, int] = {}
        self.last_exit: ExitInfo | None = None
        self.failure_reason: str | None = None
        self.probes: dict[str, ProbeResult] = {}
        # probe runs since Sentinel started, by probe name and result ("ok" / "fail")
        self.probe_counts: dict[str, dict[str, int]] = {}
        self.stalled_reason: str | None = None
        # issue 15: local streams that got nothing mid-stream (proxy.stream_idle_timeout_s)
        self.stream_stalls: int = 0
        self._degraded: dict[str, str] = {}  # source -> reason (e.g. "gpu" -> "...")
        # readiness as last computed by the probes (sentinel.probes): overall and per check
        self.ready: bool = False
        self.ready_checks: dict[str, dict[str, Any]] = {}
        # latest values of the engine's own series (scraped from its /metrics by the
        # probes), e.g. "vllm:num_requests_running", "vllm:num_requests_waiting",
        # "vllm:generation_tokens_total"; read by the proxy for spill decisions
        self.engine_metrics: dict[str, float] = {}
        self.engine_metrics_at: float | None = None
        self.zombies_reaped: int = 0
        self.orphans_killed: int = 0
        self.drain: DrainInfo | None = None  # issue 16: set while draining
        # issue 16: engine processes that survived SIGKILL ([{pid, state, wchan, ...}])
        self.unkillable: list[dict[str, Any]] = []
        self._listeners: list[Listener] = []

    # ---- writers -----------------------------------------------------------
    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in list(self._listeners):
            listener(self)

    def set_lifecycle(self, lifecycle: Lifecycle, reason: str | None = None) -> None:
        if lifecycle != self.lifecycle:
            self.lifecycle = lifecycle
            self.lifecycle_since = self._clock()
        if lifecycle == Lifecycle.failed:
            self.failure_reason = reason
        self._changed()

    def new_generation(self) -> int:
        self.generation += 1
        self.generation_started_at = self._clock()
        self.loaded_at = None
        self.processes = []
        self.probes = {}
        self.stalled_reason = None
        self.failure_reason = None
        self.ready, self.ready_checks = False, {}
        self.engine_metrics, self.engine_metrics_at = {}, None
        self.set_lifecycle(Lifecycle.starting)
        return self.generation

    def mark_loaded(self) -> None:
        if self.loaded_at is None:
            self.loaded_at = self._clock()
            if self.lifecycle == Lifecycle.starting:
                self.set_lifecycle(Lifecycle.running)

    def set_processes(self, processes: list[ProcessInfo]) -> None:
        self.processes = list(processes)

    def record_exit(self, info: ExitInfo) -> None:
        self.last_exit = info
        self._changed()

    def record_restart(self, reason: str, detail: str = "") -> None:
        self.restarts.append(
            RestartRecord(self._clock(), self.generation, reason=reason, detail=detail)
        )
        self.restart_counts[reason] = self.restart_counts.get(reason, 0) + 1
        self._changed()

    def record_probe(self, result: ProbeResult) -> None:
        self.probes[result.name] = result
        counts = self.probe_counts.setdefault(result.name, {"ok": 0, "fail": 0})
        counts["ok" if result.ok else "fail"] += 1

    def set_readiness(self, ready: bool, checks: dict[str, dict[str, Any]]) -> None:
        changed = ready != self.ready
        self.ready, self.ready_checks = ready, checks
        if changed:
            self._changed()

    def set_engine_metrics(self, values: dict[str, float]) -> None:
        self.engine_metrics = values
        self.engine_metrics_at = self._clock()

    def set_stalled(self, reason: str | None) -> None:
        if reason != self.stalled_reason:
            self.stalled_reason = reason
            self._changed()

    def set_degraded(self, source: str, reason: str) -> None:
        with self._lock:
            self._degraded[source] = reason

    def clear_degraded(self, source: str) -> None:
        with self._lock:
            self._degraded.pop(source, None)

    def set_drain(self, info: DrainInfo | None) -> None:
        self.drain = info
        self._changed()

    def set_unkillable(self, procs: list[dict[str, Any]]) -> None:
        self.unkillable = list(procs)
        self._changed()

    # ---- readers -----------------------------------------------------------
    def degraded_reasons(self) -> dict[str, str]:
        with self._lock:
            return dict(self._degraded)

    @property
    def loaded(self) -> bool:
        return self.loaded_at is not None

    def state(self) -> EngineState:
        """The engine's routing state. A drain shows here only when its new requests go
        to the next tier (``fallback``): without one, requests accepted before the drain
        still finish on the local engine, and new ones are refused at the proxy's gate."""
        lc = self.lifecycle
        if self.unkillable:
            return EngineState.unkillable
        if self.drain is not None and self.drain.fallback and lc != Lifecycle.stopped:
            return EngineState.draining
        if lc == Lifecycle.failed:
            return EngineState.failed
        if lc == Lifecycle.stopped:
            return EngineState.stopped
        if lc == Lifecycle.draining:
            return EngineState.draining
        if lc == Lifecycle.restarting:
            return EngineState.restarting
        if lc == Lifecycle.starting or not self.loaded:
            return EngineState.starting
        if self.stalled_reason:
            return EngineState.stalled
        if self.degraded_reasons():
            return EngineState.degraded
        return EngineState.ready

    def display_state(self) -> EngineState:
        """The state a person sees (/status, sentinel_engine_state): ``draining`` for any
        drain, where ``state()`` (routing) says so only when new requests go elsewhere."""
        state = self.state()
        if self.drain is not None and state not in (EngineState.stopped, EngineState.unkillable):
            return EngineState.draining
        return state

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready view for /status and the CLI."""
        now = self._clock()
        return {
            "state": self.display_state().value,
            "lifecycle": self.lifecycle.value,
            "lifecycle_since": self.lifecycle_since,
            "generation": self.generation,
            "generation_started_at": self.generation_started_at,
            "loaded_at": self.loaded_at,
            "failure_reason": self.failure_reason,
            "stalled_reason": self.stalled_reason,
            "degraded_reasons": self.degraded_reasons(),
            "processes": [asdict(p) for p in self.processes],
            "restarts": [asdict(r) for r in self.restarts],
            "restart_counts": dict(self.restart_counts),
            "last_exit": asdict(self.last_exit) if self.last_exit else None,
            "probes": {
                k: {**asdict(v), "age_s": round(now - v.at, 3)} for k, v in self.probes.items()
            },
            "ready": self.ready,
            "ready_checks": self.ready_checks,
            "zombies_reaped": self.zombies_reaped,
            "orphans_killed": self.orphans_killed,
            "drain": asdict(self.drain) if self.drain else None,
            "unkillable": list(self.unkillable),
        }
