"""Attach mode (engine.mode: attach, issue 18): guard an engine Sentinel did not launch.

The same interface the app wires for the launch-mode ``Supervisor`` (request_stop,
request_restart, engine_base_url, owned_pids, log_tail, run, ...), for an engine in
another container of the pod. Sentinel finds the engine's processes (``discovery``),
publishes them as the current generation (per-process telemetry, GPU memory, watchdogs,
py-spy dumps all read ``EngineStatus.processes``), and where launch mode would restart
the engine it *recovers*: dumps first, then SIGTERM / grace / SIGKILL to the engine's
processes so that the kubelet restarts the container. It never launches anything.

Never a loop: no recovery within engine.attach.recovery_holdoff_s of the last one, and
none while a newly found engine is still starting (engine.attach.startup_grace_s); an
engine that does not load within that grace is ended once (reason ``startup_timeout``).
A stop (SIGTERM, after the drain) only makes Sentinel exit: the engine is not its to stop.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psutil

from sentinel.config.schema import EngineConfig, SupervisorConfig
from sentinel.engine import proctree
from sentinel.engine.commands import HUNG_REASONS, OPERATOR_REASONS
from sentinel.engine.discovery import Discovery, discover
from sentinel.engine.inbox import Inbox
from sentinel.logs import get_logger
from sentinel.state import EngineStatus, Lifecycle, ProcessInfo

log = get_logger("sentinel.engine.attach")


def _alive(identity: tuple[int, float]) -> bool:
    """Whether the process (pid, create time) still runs (a reused pid is another one)."""
    try:
        proc = psutil.Process(identity[0])
        return proc.create_time() == identity[1] and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


EvidenceHook = Callable[[str, str], Awaitable[None]]
Discover = Callable[[], Discovery]


class AttachedEngine:
    """Watches (and, when allowed, ends) an engine it did not launch."""

    def __init__(
        self,
        engine_cfg: EngineConfig,
        supervisor_cfg: SupervisorConfig,
        status: EngineStatus,
        *,
        discover_fn: Discover | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = engine_cfg.attach
        self.sup_cfg = supervisor_cfg
        self.status = status
        self._url = engine_cfg.attach_url()
        port = engine_cfg.attach_port()
        host = engine_cfg.attach_host()
        self._discover = discover_fn or (lambda: discover(self.cfg, port, host))
        self._clock = clock
        self.startup_grace_s = self.cfg.startup_grace_s or supervisor_cfg.startup_timeout_s
        # the same hooks the app sets on the launch-mode supervisor
        self.before_hang_restart: EvidenceHook | None = None
        self.gpu_processes: Callable[[], list[tuple[int, int, int]]] | None = None
        self.env_extenders: list[Callable[[dict[str, str]], None]] = []  # nothing is launched
        self._inbox = Inbox()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._exit_code: int | None = None
        self.last: Discovery = Discovery()
        self._identity: tuple[int, float] | None = None  # (pid, create time) of the API server
        self._known = False  # an engine was identified before (a new one: a new generation)
        self._seen_at: float | None = None  # when the current engine was first found
        self._last_recovery: float | None = None
        self._recovering = False
        # a recovery held back (holdoff, start-up grace): done once allowed, if still needed
        # (the probes ask once per generation)
        self._pending: tuple[str, str] | None = None
        self.recoveries: dict[str, int] = {}
        self.refused: dict[str, int] = {}  # recoveries not done, by why
        self.last_refusal: str | None = None

    # ---- the interface the app, probes, drain and watchdogs use -------------
    @property
    def engine_base_url(self) -> str:
        return self._url

    def request_stop(
        self, sig: int = signal.SIGTERM, exit_after: bool = True, grace_s: float | None = None
    ) -> None:
        """Exit (after the drain); the engine keeps running: it is not Sentinel's to stop."""
        self._put(("stop", int(sig), exit_after))

    def request_restart(self, reason: str, detail: str = "") -> None:
        self._put(("restart", reason, detail))

    def notify_child_exit(self) -> None:
        """Nothing to reap: the engine is not Sentinel's child."""

    def owned_pids(self) -> set[int]:
        return {m.pid for m in self.last.members}

    def log_tail(self) -> list[str]:
        return []  # the engine's output goes to its own container's log

    def describe(self) -> dict[str, Any]:
        """The ``attach`` section of /status (and `sentinel status`)."""
        pids: dict[str, list[int]] = {}
        for m in self.last.members:
            pids.setdefault(m.role, []).append(m.pid)
        return {
            "mode": "attach",
            "base_url": self._url,
            "pids": pids,
            "problem": self.last.problem,
            "verified": self.last.verified,  # seen serving the URL's port: recoverable
            "recovery": self.cfg.recovery,
            "recoveries": dict(self.recoveries),
            "refused": dict(self.refused),
            "last_refusal": self.last_refusal,
            "holdoff_left_s": round(self._holdoff_left(), 1),
            "pending": self._pending[0] if self._pending else None,
        }

    def _put(self, item: tuple[Any, ...]) -> None:
        self._inbox.put(item)

    # ---- main loop -------------------------------------------------------------
    async def run(self) -> int:
        self._loop = self._inbox.bind()
        log.info(
            "attached to an engine Sentinel did not launch",
            mode="attach",
            url=self._url,
            recovery=self.cfg.recovery,
            pid=os.getpid(),
        )
        self.status.new_generation()  # probed from now on, processes found or not
        while self._exit_code is None:
            try:
                await self.discover_now()
            except Exception as exc:  # noqa: BLE001 - a failed look never stops the guard
                log.error("looking for the engine's processes failed", error=repr(exc))
            try:
                cmd = await asyncio.wait_for(self._inbox.queue.get(), self.cfg.discover_interval_s)
            except TimeoutError:
                cmd = None
            if cmd is not None:
                await self.handle(cmd)
            if self._exit_code is None:
                await self._check_startup()
            if self._exit_code is None:
                await self.retry_pending()
        self.status.set_lifecycle(Lifecycle.stopped)
        return self._exit_code

    async def handle(self, cmd: tuple[Any, ...]) -> None:
        if cmd[0] == "stop":
            if cmd[2]:
                log.info("stopping: the attached engine is left running", signal=cmd[1])
                self._exit_code = 0
            else:
                log.warning("a preemption notice: the attached engine is not Sentinel's to stop")
        elif cmd[0] == "restart":
            await self.recover(cmd[1], cmd[2])

    async def discover_now(self) -> Discovery:
        found = await asyncio.to_thread(self._discover)
        self.apply(found)
        return found

    def apply(self, found: Discovery) -> None:
        """Publish a discovery: a new API server is a new generation, a vanished one
        means the engine is gone (the kubelet restarts it)."""
        prev, self.last = self.last, found
        if found.problem and found.problem != prev.problem:
            log.warning("engine processes not identified", problem=found.problem)
        ident = found.identity
        if ident is None and self._identity is not None and found.problem:
            if _alive(self._identity):
                # the engine runs on, it just cannot be told apart now (a second candidate,
                # a pid file being rewritten): not a crash, not a new generation; its
                # processes stay published, and nothing is signalled meanwhile (unverified)
                self.last = Discovery(
                    members=prev.members, problem=found.problem, candidates=found.candidates
                )
                return
        if ident != self._identity:
            if self._identity is not None and not self._recovering:
                gone_pid = self._identity[0]
                if _alive(self._identity):
                    log.warning(
                        "another process taken for the attached engine; the previous one runs on",
                        previous=gone_pid,
                        now=ident[0] if ident else None,
                    )
                else:
                    why = f"the attached engine's API server (pid {gone_pid}) went away"
                    log.error("attached engine gone", pid=gone_pid)
                    self.status.record_restart("crashed", why)
            if ident is None:
                self.status.set_lifecycle(Lifecycle.restarting)
                self.status.set_processes([])
            else:
                if self._known:
                    self.status.new_generation()
                self._known = True
                self._seen_at = self._clock()
                self._pending = None  # a new engine: the probes judge it afresh
                log.info(
                    "attached engine found",
                    generation=self.status.generation,
                    pids={m.role: m.pid for m in found.members},
                )
            self._identity = ident
        if ident is not None:
            gen = self.status.generation
            self.status.set_processes(
                [ProcessInfo(m.pid, m.role, gen, m.create_time) for m in found.members]
            )

    async def _check_startup(self) -> None:
        if self._seen_at is None or self._identity is None or self.status.loaded:
            return
        waited = self._clock() - self._seen_at
        if waited > self.startup_grace_s:
            await self.recover(
                "startup_timeout",
                f"the attached engine did not load within {self.startup_grace_s:g}s "
                "(engine.attach.startup_grace_s)",
            )

    # ---- recovery ----------------------------------------------------------------
    def _holdoff_left(self) -> float:
        if self._last_recovery is None:
            return 0.0
        return max(0.0, self.cfg.recovery_holdoff_s - (self._clock() - self._last_recovery))

    def _refusal(self, reason: str) -> str | None:
        if not self.cfg.recovery:
            return "recovery_disabled"
        if not self.last.members:
            return "no_processes"
        if not self.last.verified:
            return "unverified"  # not seen serving the engine's port: never signalled
        if reason in OPERATOR_REASONS:
            return None
        starting = self._seen_at is not None and not self.status.loaded
        if starting and reason != "startup_timeout":
            if self._clock() - self._seen_at <= self.startup_grace_s:
                return "starting"
        if self._holdoff_left() > 0:
            return "holdoff"
        return None

    async def recover(self, reason: str, detail: str) -> bool:
        """Where launch mode would restart: evidence first, then end the engine's
        processes. Returns whether it ended them."""
        refusal = self._refusal(reason)
        if refusal is None:
            # the verdict is about the engine seen last: look again right before signalling
            # (a restarted engine, new workers, a pid file rewritten meanwhile)
            judged = self._identity
            try:
                await self.discover_now()
            except Exception as exc:  # noqa: BLE001 - no fresh look, no signal
                log.error("looking for the engine's processes failed", error=repr(exc))
                self.last = Discovery(problem=f"discovery failed: {exc!r}")
            if self._identity != judged:
                refusal = "engine_changed"  # a new engine: the probes judge it afresh
            else:
                refusal = self._refusal(reason)
        if refusal is not None:
            if refusal in ("holdoff", "starting"):
                self._pending = (reason, detail)
            self.refused[refusal] = self.refused.get(refusal, 0) + 1
            self.last_refusal = f"{reason}: {refusal}"
            log.warning(
                "recovery of the attached engine not done",
                reason=reason,
                detail=detail,
                why=refusal,
                holdoff_left_s=round(self._holdoff_left(), 1),
                problem=self.last.problem,
            )
            return False
        self._recovering = True
        try:
            return await self._end_engine(reason, detail)
        finally:
            self._recovering = False

    async def retry_pending(self) -> None:
        """A recovery held back: do it once allowed, unless the engine is fine again."""
        if self._pending is None:
            return
        reason, detail = self._pending
        if self.status.ready and not self.status.stalled_reason:
            self._pending = None
            log.info("held-back recovery dropped: the engine is ready again", reason=reason)
            return
        if self._refusal(reason) in ("holdoff", "starting"):
            return
        self._pending = None
        await self.recover(reason, f"{detail} (held back until now)".strip())

    async def _end_engine(self, reason: str, detail: str) -> bool:
        self._last_recovery = self._clock()
        self._pending = None
        self.status.set_lifecycle(Lifecycle.restarting)
        log.warning("recovering the attached engine", reason=reason, detail=detail)
        if reason in HUNG_REASONS or reason in OPERATOR_REASONS:
            await self._preserve_evidence(reason, detail)
        members = []
        for m in self.last.members:
            try:
                proc = psutil.Process(m.pid)
                if proc.create_time() == m.create_time:
                    members.append(proctree.Member(m.pid, m.create_time, m.role, proc))
            except psutil.Error:
                continue
        report = await proctree.terminate(
            lambda: members,
            self.cfg.term_grace_s,
            lambda: None,  # not Sentinel's children: the engine container's init reaps them
            kill_wait_s=self.cfg.kill_wait_s,
        )
        self.recoveries[reason] = self.recoveries.get(reason, 0) + 1
        self.status.record_restart(reason, detail)
        log.warning(
            "attached engine's processes ended; its container restarts it",
            reason=reason,
            termed=report.termed,
            killed=report.killed,
            survivors=report.survivors,
            seconds=round(report.seconds, 3),
        )
        if report.survivors:
            log.error(
                "attached engine processes survive SIGKILL (no KILL capability?)",
                pids=report.survivors,
            )
        self._identity = None
        self._seen_at = None
        self._known = True
        self.last = Discovery()
        self.status.set_processes([])
        return True

    async def _preserve_evidence(self, reason: str, detail: str) -> None:
        hook = self.before_hang_restart
        if hook is None:
            return
        try:
            await asyncio.wait_for(hook(reason, detail), self.sup_cfg.evidence_timeout_s)
        except TimeoutError:
            log.warning("preserving evidence took too long; recovering anyway", reason=reason)
        except Exception as exc:  # noqa: BLE001 - evidence never blocks the recovery
            log.error("preserving evidence failed", reason=reason, error=str(exc))
