"""The engine supervisor: one asyncio loop that launches, watches, restarts and stops
the engine, consuming a command queue.

Everything that happens from outside (signals, probes asking for a restart, SIGCHLD)
only puts a command on the queue (``request_stop``, ``request_restart``,
``notify_child_exit``); the loop acts on it. Reaping uses ``waitpid(-1)`` from the
loop, never an asyncio child watcher, so the engine is spawned with
``subprocess.Popen`` and never awaited through asyncio's subprocess API.

Per generation: launch (own session, output on pipes) -> watch (pidfd on the API
server, EngineCore and Workers; periodic scan of the tree; start-up timeout) ->
end (TERM everything of the generation, grace, KILL; drain its output; explain the
exit) -> restart after backoff, or `failed` on a crash loop.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import httpx
import psutil

from sentinel.config.schema import EngineConfig, LifecycleConfig, SupervisorConfig
from sentinel.engine import command, launcher, proctree, runstate
from sentinel.engine import diagnose as dx
from sentinel.engine.backoff import Backoff, CrashLoopGuard
from sentinel.engine.commands import CommandsMixin
from sentinel.engine.ending import EndingMixin
from sentinel.engine.generation import Generation, WatchMixin
from sentinel.engine.inbox import Inbox
from sentinel.engine.leftovers import LeftoversMixin
from sentinel.engine.logcapture import EngineLine, LogTail
from sentinel.engine.unkillable import UnkillableMixin
from sentinel.logs import get_logger
from sentinel.net import local_url
from sentinel.state import EngineStatus, ProcessInfo

log = get_logger("sentinel.engine")

GpuProcesses = Callable[[], list[tuple[int, int, int]]]
# awaited (bounded by supervisor.evidence_timeout_s) before a restart for a hang
EvidenceHook = Callable[[str, str], Awaitable[None]]

IDLE_WAKE_S = 1.0  # the loop reaps at least this often, SIGCHLD or not
LOAD_POLL_S = 1.0


class Supervisor(WatchMixin, CommandsMixin, EndingMixin, UnkillableMixin, LeftoversMixin):
    """Owns the engine's process tree for one `sentinel run`."""

    def __init__(
        self,
        engine_cfg: EngineConfig,
        supervisor_cfg: SupervisorConfig,
        status: EngineStatus,
        gpu_processes: GpuProcesses | None = None,
        *,
        engine_lines: bool = True,
        detect_load: bool = True,
        withhold_env: Collection[str] = (),
        lifecycle: LifecycleConfig | None = None,
    ) -> None:
        self.engine_cfg = engine_cfg
        # variables that never reach the engine (secrets' sources: command.secret_env_names)
        self._withhold_env = frozenset(withhold_env)
        self.cfg = supervisor_cfg
        self.life = lifecycle if lifecycle is not None else LifecycleConfig()
        # issue 16: evidence (stack dumps, snapshot) before a restart for a hang
        self.before_hang_restart: EvidenceHook | None = None
        self.status = status
        self.gpu_processes = gpu_processes
        self._engine_lines = engine_lines
        # until the probes mark the engine loaded on a first real inference, the
        # supervisor notices /health answering (see _detect_loaded)
        self.detect_load = detect_load
        self._argv = command.build_argv(engine_cfg)
        if self.life.vllm_shutdown_timeout and command.wants_shutdown_timeout(engine_cfg):
            # vLLM finishes its own requests on TERM for this long (< the stop grace)
            self._argv += ["--shutdown-timeout", str(max(1, int(supervisor_cfg.stop_grace_s) - 2))]
        self._ctx = dx.LaunchContext(
            model=engine_cfg.model,
            host=engine_cfg.host,
            port=engine_cfg.port,
            python=(self._argv[0] if engine_cfg.command else engine_cfg.python or "python"),
            managed_port=command.uses_managed_port(engine_cfg),
        )
        self._tail = LogTail(supervisor_cfg.log_tail_lines)
        self._backoff = Backoff.from_config(supervisor_cfg)
        self._guard = CrashLoopGuard(
            supervisor_cfg.crash_loop_max_starts, supervisor_cfg.crash_loop_window_s
        )
        self._inbox = Inbox()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subreaper = False
        self._current: Generation | None = None
        self._gens: list[Generation] = []  # generations that may still have processes
        self._history: deque[proctree.GenerationTree] = deque(maxlen=32)
        self._launch_at: float | None = None
        self._launch_counted = True
        self._stop_signal: int | None = None
        self._stop_requests = 0
        self._failed = False
        self._exit_code: int | None = None
        self._next_scan = 0.0
        self._foreign_reported: set[tuple[int, float]] = set()
        # called on the engine's environment before each launch (issue 17: the agent)
        self.env_extenders: list[Callable[[dict[str, str]], None]] = []
        # issue 16: the state file and the guard; earlier generations' GPU holders
        self._state_file: runstate.StateFile | None = None
        self._guard_proc: subprocess.Popen[bytes] | None = None
        self._guard_fd: int | None = None
        self._ticks: dict[tuple[int, float], tuple[int, list[str]]] = {}
        self._gpu_suspects: set[int] = set()
        self._parked = False

    # ---- the interface for signal handlers and other components -------------
    def request_stop(
        self, sig: int = signal.SIGTERM, exit_after: bool = True, grace_s: float | None = None
    ) -> None:
        """Stop the engine gracefully and make run() return. A second call cuts the grace.
        ``exit_after=False`` (a preemption notice): stop the engine and launch no other;
        Sentinel stays up to report it until it is stopped. ``grace_s``: the engine's grace
        instead of supervisor.stop_grace_s (after a drain left nothing in flight)."""
        self._stop_requests += 1
        self._put(("stop", int(sig), exit_after, grace_s))

    def request_restart(self, reason: str, detail: str = "") -> None:
        """Replace the engine generation (reason: sighup, stalled, not_ready, ...)."""
        self._put(("restart", reason, detail))

    def notify_child_exit(self) -> None:
        """SIGCHLD arrived: reap soon."""
        self._put(("child",))

    @property
    def engine_base_url(self) -> str:
        return local_url(self.engine_cfg.host, self.engine_cfg.port)

    def owned_pids(self) -> set[int]:
        """Pids of the current and earlier generations that are still tracked."""
        pids: set[int] = set()
        for gen in self._gens:
            pids.update(gen.tree.members)
            if not gen.leader_reaped:
                pids.add(gen.pid)
        return pids

    def log_tail(self) -> list[str]:
        return self._tail.lines()

    def _put(self, item: tuple[Any, ...]) -> None:
        self._inbox.put(item)

    # ---- main loop -------------------------------------------------------------
    async def run(self) -> int:
        """Supervise until stopped (or failed with on_failed=exit); return the exit code."""
        self._loop = self._inbox.bind()
        self._subreaper = proctree.set_child_subreaper()
        # notice at once when the probes mark the engine loaded (or anything else changes)
        self.status.subscribe(lambda _status: self._put(("wake",)))
        log.info(
            "supervisor started",
            pid=os.getpid(),
            subreaper=self._subreaper,
            pid1=os.getpid() == 1,
            command=command.redacted_argv(self._argv),
        )
        if not self._subreaper:
            log.warning(
                "could not become a child subreaper; orphans are searched system-wide by session id"
            )
        self._launch_at = time.monotonic()
        try:
            await self._take_over_runtime_state()
            while self._exit_code is None:
                try:
                    cmd = await asyncio.wait_for(self._inbox.queue.get(), self._next_wakeup())
                except TimeoutError:
                    cmd = None
                self._reap()
                if cmd is not None:
                    await self._handle(cmd)
                await self._tick()
            return self._exit_code
        finally:
            self._kill_everything_now()
            self._release_runtime_state()

    def _next_wakeup(self) -> float:
        now = time.monotonic()
        deadlines = [now + IDLE_WAKE_S, self._next_scan]
        if self._launch_at is not None:
            deadlines.append(self._launch_at)
        cur = self._current
        if cur is not None and not cur.loaded:
            deadlines.append(cur.started + self.cfg.startup_timeout_s)
        return max(0.0, min(deadlines) - now)

    async def _handle(self, cmd: tuple[Any, ...]) -> None:
        kind = cmd[0]
        if kind == "stop":
            grace = self.cfg.stop_grace_s if cmd[3] is None else cmd[3]
            if cmd[2]:
                await self._stop(cmd[1], grace, drained=cmd[3] is not None)
            else:
                await self._park(cmd[1], grace)
        elif kind == "restart":
            await self._restart(cmd[1], cmd[2])
        # "child" and "wake": the reap and the tick that follow do the work

    async def _tick(self) -> None:
        if self._stop_signal is not None:
            return
        now = time.monotonic()
        cur = self._current
        if cur is not None and not cur.ending:
            if cur.leader_reaped:
                await self._generation_failed(cur, "crashed")
                return
            if cur.dead_core:
                role, pid = cur.dead_core[0]
                name = {"engine_core": "EngineCore", "worker": "Worker"}.get(role, role)
                await self._generation_failed(
                    cur,
                    "crashed",
                    forced=(
                        f"{role}_died",
                        f"the engine's {name} process (pid {pid}) died while the API server "
                        "was still up; the whole generation was replaced",
                    ),
                )
                return
            if not cur.loaded and self.status.loaded and self.status.generation == cur.number:
                cur.loaded = True
                self._backoff.reset()
                log.info(
                    "engine loaded",
                    generation=cur.number,
                    startup_s=round(now - cur.started, 2),
                )
                self._next_scan = min(self._next_scan, now)
            if not cur.loaded and now - cur.started > self.cfg.startup_timeout_s:
                await self._generation_failed(
                    cur,
                    "startup_timeout",
                    forced=(
                        "startup_timeout",
                        f"the engine did not load its model within "
                        f"{self.cfg.startup_timeout_s:g}s (supervisor.startup_timeout_s)",
                    ),
                )
                return
        if now >= self._next_scan:
            self._scan()
        if (
            self._current is None
            and self._launch_at is not None
            and now >= self._launch_at
            and not self._failed
            and not self._parked
            and not self.status.unkillable
        ):
            await self._launch()

    # ---- launching ------------------------------------------------------------------
    async def _launch(self) -> None:
        counted, self._launch_counted = self._launch_counted, True
        self._launch_at = None
        await self._ensure_no_leftovers()
        if self.status.unkillable:
            return  # launched again once those processes are gone (_recheck_unkillable)
        if not await self._gpu_released():
            return
        now = time.monotonic()
        if counted:
            self._guard.record_start(now)
        ctx = self._ctx
        if ctx.managed_port and dx.port_in_use(ctx.host, ctx.port):
            cause = (
                f"port {ctx.port} on {ctx.host} is already in use{dx.holder_hint(ctx.port)}; "
                "stop whatever holds it or choose another engine.port"
            )
            self._record_exit(self.status.generation, 0, None, "port_in_use", cause, [])
            await self._after_failure("crashed", cause)
            return
        number = self.status.new_generation()
        env = command.build_env(self.engine_cfg, withhold=self._withhold_env)
        for extend in self.env_extenders:  # e.g. the watchdog agent (issue 17)
            extend(env)
        try:
            popen = launcher.spawn(
                self._argv, env, self.engine_cfg.workdir, parent_death_kill=self._subreaper
            )
        except OSError as exc:
            what = exc.strerror or str(exc)
            reason = "command_not_found" if isinstance(exc, FileNotFoundError) else "launch_failed"
            cause = f"cannot start the engine command {self._argv[0]!r}: {what}"
            self._record_exit(number, 0, None, reason, cause, [])
            await self._after_failure("crashed", cause)
            return
        try:
            ctime = psutil.Process(popen.pid).create_time()
        except psutil.Error:
            ctime = time.time()
        tree = proctree.GenerationTree(number, popen.pid, ctime)
        gen = Generation(number, popen, tree, started=now)
        leader = proctree.Member(popen.pid, ctime, "api_server", psutil.Process(popen.pid))
        tree.members[popen.pid] = leader
        gen.readers = [
            asyncio.create_task(launcher.pump(popen.stdout, "stdout", self._line_sink(gen))),
            asyncio.create_task(launcher.pump(popen.stderr, "stderr", self._line_sink(gen))),
        ]
        self._current = gen
        self._gens.append(gen)
        self._watch(gen, leader)
        self._write_state()
        self.status.set_processes([ProcessInfo(popen.pid, "api_server", number, ctime)])
        self._next_scan = now + 0.5
        log.info(
            "engine started",
            generation=number,
            pid=popen.pid,
            command=command.redacted_argv(self._argv),
        )
        if self.detect_load:
            gen.load_task = asyncio.create_task(self._detect_loaded(gen))

    def _line_sink(self, gen: Generation) -> Callable[[EngineLine], None]:
        def sink(line: EngineLine) -> None:
            self._tail.append(gen.number, line.text)
            if self._engine_lines:
                log.info(
                    "engine",
                    role=line.role,
                    stream=line.stream,
                    pid=line.pid,
                    generation=gen.number,
                    line=line.text,
                )

        return sink

    async def _detect_loaded(self, gen: Generation) -> None:
        """Mark the generation loaded once the engine's /health answers 200.

        The one place where the supervisor decides "loaded" on its own; the probes
        call status.mark_loaded() after a first real inference, which wins."""
        url = self.engine_base_url + "/health"
        async with httpx.AsyncClient(timeout=2.0) as client:
            while self._current is gen and not gen.ending and not self.status.loaded:
                try:
                    resp = await client.get(url)
                except httpx.HTTPError:
                    resp = None
                if resp is not None and resp.status_code == 200:
                    if self._current is gen and self.status.generation == gen.number:
                        self.status.mark_loaded()
                        self._put(("wake",))
                    return
                await asyncio.sleep(LOAD_POLL_S)
