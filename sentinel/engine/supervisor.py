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
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from sentinel.config.schema import EngineConfig, LifecycleConfig, OnFailed, SupervisorConfig
from sentinel.engine import command, launcher, proctree, runstate
from sentinel.engine import diagnose as dx
from sentinel.engine.backoff import Backoff, CrashLoopGuard
from sentinel.engine.logcapture import EngineLine, LogTail
from sentinel.logs import get_logger
from sentinel.net import local_url
from sentinel.state import EngineStatus, ExitInfo, Lifecycle, ProcessInfo

log = get_logger("sentinel.engine")

GpuProcesses = Callable[[], list[tuple[int, int, int]]]
# awaited (bounded by supervisor.evidence_timeout_s) before a restart for a hang
EvidenceHook = Callable[[str, str], Awaitable[None]]
GUARD_SCRIPT = Path(__file__).with_name("guard.py")
GPU_RELEASE_POLL_S = 0.5

SCAN_STARTING_S = 1.0  # while the tree is still growing
SCAN_LOADED_S = 5.0  # once loaded; deaths are seen at once through pidfds anyway
IDLE_WAKE_S = 1.0  # the loop reaps at least this often, SIGCHLD or not
READER_DRAIN_S = 1.0
LOAD_POLL_S = 1.0
EXIT_TAIL_LINES = 50
LOGGED_TAIL_LINES = 20
CORE_ROLES = ("engine_core", "worker")
# restarts a person asked for do not count toward the crash-loop limit
OPERATOR_REASONS = frozenset({"sighup", "operator"})
# restarts of an engine presumed hung: no graceful drain, TERM then KILL after kill_grace_s
HUNG_REASONS = frozenset({"stalled", "not_ready", "startup_timeout"})


@dataclass
class _Generation:
    number: int
    popen: subprocess.Popen[bytes]
    tree: proctree.GenerationTree
    started: float  # monotonic
    readers: list[asyncio.Task[None]] = field(default_factory=list)
    load_task: asyncio.Task[None] | None = None
    exit_code: int | None = None  # the API server's, once reaped; -N = signal N
    leader_reaped: bool = False
    loaded: bool = False
    ending: bool = False
    pidfds: dict[int, int] = field(default_factory=dict)
    dead_core: list[tuple[str, int]] = field(default_factory=list)  # (role, pid)

    @property
    def pid(self) -> int:
        return self.popen.pid


class Supervisor:
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
        self._queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._subreaper = False
        self._current: _Generation | None = None
        self._gens: list[_Generation] = []  # generations that may still have processes
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
        loop = self._loop
        if loop is not None and threading.get_ident() != self._loop_thread:
            loop.call_soon_threadsafe(self._queue.put_nowait, item)
        else:
            self._queue.put_nowait(item)

    # ---- main loop -------------------------------------------------------------
    async def run(self) -> int:
        """Supervise until stopped (or failed with on_failed=exit); return the exit code."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
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
                    cmd = await asyncio.wait_for(self._queue.get(), self._next_wakeup())
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

    # ---- reaping and watching ---------------------------------------------------
    def _reap(self) -> None:
        for pid, code in proctree.reap_children():
            gen = next((g for g in self._gens if g.pid == pid and not g.leader_reaped), None)
            if gen is not None:
                gen.exit_code, gen.leader_reaped = code, True
                gen.popen.returncode = code  # keep Popen from waiting on a reused pid
                log.info(
                    "engine api server exited",
                    generation=gen.number,
                    pid=pid,
                    status=dx.describe_exit(code),
                )
            else:
                self.status.zombies_reaped += 1
                log.debug("reaped", pid=pid, status=dx.describe_exit(code))

    def _scan(self) -> None:
        now = time.monotonic()
        trees = [g.tree for g in self._gens]
        before = {g.number: dict(g.tree.members) for g in self._gens}
        changed = proctree.scan(trees, whole_system=not self._subreaper)
        by_number = {g.number: g for g in self._gens}
        for member in changed:
            for gen in self._gens:
                if gen.tree.members.get(member.pid) is member:
                    self._watch(gen, member)
        # deaths a pidfd could not report (no pidfd support, or died before watched)
        for number, members in before.items():
            gen = by_number[number]
            for pid, member in members.items():
                if pid not in gen.tree.members:
                    self._member_gone(gen, member)
        cur = self._current
        if cur is not None:
            self.status.set_processes(
                [
                    ProcessInfo(m.pid, m.role, cur.number, m.create_time)
                    for m in sorted(cur.tree.members.values(), key=lambda m: m.create_time)
                ]
            )
        loaded = cur is not None and cur.loaded
        self._next_scan = now + (SCAN_LOADED_S if loaded else SCAN_STARTING_S)
        self._prune()
        self._write_state()
        if self.status.unkillable:
            self._recheck_unkillable()

    def _watch(self, gen: _Generation, member: proctree.Member) -> None:
        """Be told at once when the API server, EngineCore or a Worker exits."""
        if member.pid in gen.pidfds or (member.role not in CORE_ROLES and member.pid != gen.pid):
            return
        if not hasattr(os, "pidfd_open") or self._loop is None:
            return
        try:
            fd = os.pidfd_open(member.pid)
        except ProcessLookupError:
            self._member_gone(gen, member)
            return
        except OSError:
            return  # no pidfd support: the periodic scan notices deaths
        gen.pidfds[member.pid] = fd
        self._loop.add_reader(fd, self._on_pidfd, gen, member)

    def _on_pidfd(self, gen: _Generation, member: proctree.Member) -> None:
        self._unwatch(gen, member.pid)
        self._member_gone(gen, member)
        self._put(("child",))

    def _unwatch(self, gen: _Generation, pid: int) -> None:
        fd = gen.pidfds.pop(pid, None)
        if fd is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(fd)
        os.close(fd)

    def _member_gone(self, gen: _Generation, member: proctree.Member) -> None:
        if (
            gen is self._current
            and not gen.ending
            and member.role in CORE_ROLES
            and (member.role, member.pid) not in gen.dead_core
        ):
            gen.dead_core.append((member.role, member.pid))

    def _members(self, gen: _Generation) -> list[proctree.Member]:
        before = dict(gen.tree.members)
        proctree.scan([gen.tree], whole_system=not self._subreaper)
        for pid in before:
            if pid not in gen.tree.members:
                self._unwatch(gen, pid)
        return list(gen.tree.members.values())

    def _prune(self) -> None:
        for gen in list(self._gens):
            if gen is self._current or gen.tree.members or not gen.leader_reaped:
                continue
            for pid in list(gen.pidfds):
                self._unwatch(gen, pid)
            self._gens.remove(gen)
            self._history.append(gen.tree)

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
        gen = _Generation(number, popen, tree, started=now)
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

    def _line_sink(self, gen: _Generation) -> Callable[[EngineLine], None]:
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

    async def _detect_loaded(self, gen: _Generation) -> None:
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

    # ---- ending a generation --------------------------------------------------------
    async def _end_generation(
        self,
        gen: _Generation,
        grace_s: float,
        forced: tuple[str, str] | None = None,
        escalate: Callable[[], bool] = lambda: False,
        api_server_first: bool = False,
    ) -> ExitInfo:
        """Terminate everything of ``gen`` (TERM, grace, KILL), drain its output,
        explain and record its exit. ``api_server_first``: TERM the API server alone and
        the rest once it has exited (a graceful stop)."""
        gen.ending = True
        leader_was_alive = not gen.leader_reaped
        if gen.load_task is not None:
            gen.load_task.cancel()
        report = await proctree.terminate(
            lambda: self._members(gen),
            grace_s,
            self._reap,
            escalate=escalate,
            kill_wait_s=self.life.unkillable_after_s,
            first=(lambda m: m.pid == gen.pid) if api_server_first else None,
        )
        self._gpu_suspects.update(report.termed + report.killed)
        others = {p for p in report.termed + report.killed if p != gen.pid}
        self.status.orphans_killed += len(others)
        if report.termed or report.killed:
            log.info(
                "engine generation terminated",
                generation=gen.number,
                termed=report.termed,
                killed=report.killed,
                seconds=round(report.seconds, 3),
                api_server_was_alive=leader_was_alive,
            )
        if report.survivors:
            self._mark_unkillable(gen.number, report.survivors, _roles(gen))
        for _ in range(50):  # the API server is dead; its status arrives with the reap
            if gen.leader_reaped:
                break
            await asyncio.sleep(0.02)
            self._reap()
        await self._drain_readers(gen)
        tail = self._tail.lines(gen.number, last=EXIT_TAIL_LINES)
        code = gen.exit_code
        if forced is not None:
            reason, cause = forced
        else:
            d = dx.diagnose(code, tail, self._ctx, gen.loaded)
            reason, cause = d.reason, d.cause
        info = self._record_exit(gen.number, gen.pid, code, reason, cause, tail)
        if self._current is gen:
            self._current = None
        self._prune()
        await self._gpu_cleanup()
        return info

    def _record_exit(
        self, number: int, pid: int, code: int | None, reason: str, cause: str, tail: list[str]
    ) -> ExitInfo:
        info = ExitInfo(
            generation=number,
            pid=pid,
            returncode=code if code is not None and code >= 0 else None,
            signal=-code if code is not None and code < 0 else None,
            at=time.time(),
            cause=cause,
            reason=reason,
            log_tail=tail,
        )
        self.status.record_exit(info)
        expected = reason in ("stopped", "restarted")
        (log.info if expected else log.error)(
            "engine exited",
            generation=number,
            reason=reason,
            cause=cause,
            status=dx.describe_exit(code) if pid else "not started",
            log_tail=tail[-LOGGED_TAIL_LINES:] if not expected else None,
        )
        return info

    async def _drain_readers(self, gen: _Generation) -> None:
        pending = [t for t in gen.readers if not t.done()]
        if pending:
            _, still = await asyncio.wait(pending, timeout=READER_DRAIN_S)
            for task in still:
                task.cancel()
            for task in still:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _generation_failed(
        self, gen: _Generation, restart_reason: str, forced: tuple[str, str] | None = None
    ) -> None:
        self.status.set_lifecycle(Lifecycle.restarting)
        if restart_reason in HUNG_REASONS and forced is not None:
            await self._preserve_evidence(restart_reason, forced[1])
        info = await self._end_generation(gen, self.cfg.kill_grace_s, forced)
        await self._after_failure(restart_reason, info.cause)

    async def _after_failure(self, restart_reason: str, cause: str) -> None:
        """After an unexpected end or a failed launch: back off and restart, or give up."""
        if self._stop_signal is not None:
            return
        now = time.monotonic()
        if self._guard.tripped(now):
            n = self._guard.starts_in_window(now)
            why = (
                f"crash loop: {n} starts within {self.cfg.crash_loop_window_s:g}s "
                f"(supervisor.crash_loop_max_starts); last failure: {cause}"
            )
            self._enter_failed(why)
            return
        delay = self._backoff.next_delay()
        self.status.record_restart(restart_reason, cause)
        self.status.set_lifecycle(Lifecycle.restarting)
        self._launch_at = now + delay
        log.warning(
            "engine restarting",
            reason=restart_reason,
            in_s=round(delay, 2),
            attempt=self._backoff.attempt,
            starts_in_window=self._guard.starts_in_window(now),
        )

    def _enter_failed(self, why: str) -> None:
        self._failed = True
        self._launch_at = None
        self.status.set_lifecycle(Lifecycle.failed, why)
        log.error(
            "engine failed",
            state="failed",
            reason=why,
            on_failed=self.cfg.on_failed.value,
            log_tail=self._tail.lines(last=LOGGED_TAIL_LINES),
        )
        if self.cfg.on_failed == OnFailed.exit:
            self._exit_code = 1

    async def _ensure_no_leftovers(self) -> None:
        """Before a launch: nothing of an earlier generation may survive."""
        for gen in list(self._gens):
            if gen is self._current:
                continue
            if self._members(gen):
                report = await proctree.terminate(
                    lambda g=gen: self._members(g),
                    self.cfg.kill_grace_s,
                    self._reap,
                    kill_wait_s=self.life.unkillable_after_s,
                )
                if report.survivors:
                    self._mark_unkillable(gen.number, report.survivors, _roles(gen))
                self.status.orphans_killed += len(set(report.termed + report.killed))
                log.warning(
                    "killed leftover processes of an earlier generation",
                    generation=gen.number,
                    pids=sorted(set(report.termed + report.killed)),
                )
        self._prune()
        await self._gpu_cleanup()

    async def _gpu_cleanup(self) -> None:
        """Kill GPU holders of earlier generations; report (or kill, if configured)
        GPU processes Sentinel did not start."""
        if self.gpu_processes is None:
            return
        try:
            rows = await asyncio.to_thread(self.gpu_processes)
        except (OSError, RuntimeError, ValueError) as exc:
            log.warning("listing GPU processes failed", error=str(exc))
            return
        wanted = set(self.engine_cfg.gpu_indices)
        cur = self._current
        for pid, gpu, used in rows:
            if (wanted and gpu not in wanted) or pid == os.getpid():
                continue
            try:
                proc = psutil.Process(pid)
                ctime = proc.create_time()
                name = proc.name()
            except psutil.Error:
                continue  # gone, or not visible from here (another pid namespace)
            if cur is not None and cur.tree.owns(proc, ctime):
                continue
            trees = [g.tree for g in self._gens if g is not cur] + list(self._history)
            owner = next((t for t in trees if t.owns(proc, ctime)), None)
            member = proctree.Member(pid, ctime, "other", proc)
            if owner is not None:
                await proctree.terminate(lambda m=member: [m], self.cfg.kill_grace_s, self._reap)
                self.status.orphans_killed += 1
                log.warning(
                    "killed a GPU process of an earlier generation",
                    pid=pid,
                    name=name,
                    gpu=gpu,
                    used_bytes=used,
                    generation=owner.number,
                )
            elif self.cfg.kill_foreign_gpu_processes:
                await proctree.terminate(lambda m=member: [m], self.cfg.kill_grace_s, self._reap)
                log.warning(
                    "killed a GPU process Sentinel did not start "
                    "(supervisor.kill_foreign_gpu_processes)",
                    pid=pid,
                    name=name,
                    gpu=gpu,
                    used_bytes=used,
                )
            elif (pid, ctime) not in self._foreign_reported:
                self._foreign_reported.add((pid, ctime))
                log.warning(
                    "GPU process not started by Sentinel holds memory on the engine's GPU; "
                    "left alone",
                    pid=pid,
                    name=name,
                    gpu=gpu,
                    used_bytes=used,
                )

    # ---- commands ----------------------------------------------------------------
    async def _stop(self, sig: int, grace_s: float, drained: bool = False) -> None:
        if self._stop_signal is not None:
            return
        self._stop_signal = sig
        self._launch_at = None
        name = _signame(sig)
        log.info("stopping", signal=name, grace_s=grace_s)
        self.status.set_lifecycle(Lifecycle.draining)
        cur = self._current
        if cur is not None:
            await self._end_generation(
                cur,
                grace_s,
                forced=("stopped", f"stopped on {name}"),
                escalate=lambda: self._stop_requests > 1,
                api_server_first=True,
            )
        await self._ensure_no_leftovers()
        self.status.set_lifecycle(Lifecycle.stopped)
        if cur is not None:
            code = proctree.exit_code_for_shell(cur.exit_code)
            if drained and cur.exit_code == -signal.SIGKILL and self._stop_requests == 1:
                code = 0  # KILLed on purpose after a drain left nothing to lose: a clean stop
        else:
            code = 1 if self._failed else 0
        log.info(
            "sentinel exiting",
            exit_code=code,
            engine=dx.describe_exit(cur.exit_code) if cur is not None else "not running",
        )
        self._exit_code = code

    async def _restart(self, reason: str, detail: str) -> None:
        if self._stop_signal is not None:
            return
        if self._parked:
            if reason not in OPERATOR_REASONS:
                log.info("engine stopped for a preemption notice; not restarting", reason=reason)
                return
            self._parked = False
        counted = reason not in OPERATOR_REASONS
        log.info("restart requested", reason=reason, detail=detail)
        now = time.monotonic()
        if self._failed:
            if counted:
                log.info("engine is failed; only an operator restart (SIGHUP) revives it")
                return
            self._failed = False
            self._guard.reset()
            self._backoff.reset()
        self.status.record_restart(reason, detail)
        self.status.set_lifecycle(Lifecycle.restarting)
        cur = self._current
        if cur is not None:
            why = f"restart requested: {reason}" + (f" ({detail})" if detail else "")
            hung = reason in HUNG_REASONS
            if hung:
                await self._preserve_evidence(reason, detail)
            grace = self.cfg.kill_grace_s if hung else self.cfg.stop_grace_s
            await self._end_generation(
                cur, grace, forced=("restarted", why), api_server_first=not hung
            )
        if counted and self._guard.tripped(now):
            n = self._guard.starts_in_window(now)
            self._enter_failed(
                f"crash loop: {n} starts within {self.cfg.crash_loop_window_s:g}s; "
                f"last restart requested: {reason} {detail}".strip()
            )
            return
        self._launch_counted = counted
        self._launch_at = time.monotonic()

    async def _park(self, sig: int, grace_s: float) -> None:
        """A preemption notice: stop the engine gracefully, launch no other, stay up."""
        if self._stop_signal is not None or self._parked:
            return
        self._parked = True
        self._launch_at = None
        log.info("stopping the engine for a preemption notice", grace_s=grace_s)
        self.status.set_lifecycle(Lifecycle.draining)
        cur = self._current
        if cur is not None:
            await self._end_generation(
                cur,
                grace_s,
                forced=("stopped", "stopped for a preemption notice"),
                escalate=lambda: self._stop_requests > 1,
                api_server_first=True,
            )
        await self._ensure_no_leftovers()
        self.status.set_lifecycle(Lifecycle.stopped)

    async def _preserve_evidence(self, reason: str, detail: str) -> None:
        """Await the evidence hook (dumps, snapshot) before a restart for a hang, bounded
        by supervisor.evidence_timeout_s; its failure never blocks the restart."""
        hook = self.before_hang_restart
        if hook is None:
            return
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(hook(reason, detail), self.cfg.evidence_timeout_s)
        except TimeoutError:
            log.warning(
                "preserving evidence took too long; restarting anyway",
                reason=reason,
                limit_s=self.cfg.evidence_timeout_s,
            )
            return
        except Exception as exc:  # noqa: BLE001 - evidence is best effort
            log.error(
                "preserving evidence failed", reason=reason, error=f"{type(exc).__name__}: {exc}"
            )
            return
        log.info(
            "evidence preserved before restart",
            reason=reason,
            seconds=round(time.monotonic() - t0, 3),
        )

    # ---- processes that will not die ------------------------------------------------------
    def _mark_unkillable(self, number: int, pids: list[int], roles: dict[int, str]) -> None:
        known = {p["pid"] for p in self.status.unkillable}
        procs = list(self.status.unkillable)
        for pid in pids:
            if pid in known:
                continue
            info = {
                **proctree.describe_stuck(pid),
                "role": roles.get(pid, "other"),
                "generation": number,
                "since": time.time(),
            }
            procs.append(info)
            log.error(
                "engine process survives SIGKILL: state unkillable; no restart until it "
                "is gone (the node may need replacing)",
                pid=pid,
                role=info["role"],
                generation=number,
                proc_state=info["state"],
                state_name=info["state_name"],
                wchan=info["wchan"],
            )
        self.status.set_unkillable(procs)

    def _recheck_unkillable(self) -> None:
        left = []
        for info in self.status.unkillable:
            now = proctree.describe_stuck(int(info["pid"]))
            if now["state"] not in ("gone", "Z"):
                left.append({**info, "state": now["state"], "wchan": now["wchan"]})
        if len(left) != len(self.status.unkillable):
            gone = {p["pid"] for p in self.status.unkillable} - {p["pid"] for p in left}
            log.warning("unkillable engine processes are gone", pids=sorted(gone), left=len(left))
            self.status.set_unkillable(left)
            if not left and self._launch_at is None and self._current is None:
                self._launch_at = time.monotonic()

    # ---- the state file, the guard, earlier Sentinels ------------------------------------
    async def _take_over_runtime_state(self) -> None:
        """Before the first launch: kill what an earlier Sentinel of this engine port left
        (its state file), wait for its GPU memory, then start the guard."""
        root = self.life.runtime_dir or runstate.default_runtime_dir()
        sf = runstate.StateFile(Path(root) / f"engine-{self.engine_cfg.port}.json")
        try:
            sf.prepare()
        except OSError as exc:
            log.warning(
                "runtime directory not usable: no state file and no guard; a SIGKILLed "
                "Sentinel may leave engine processes behind (lifecycle.runtime_dir)",
                dir=str(sf.path.parent),
                error=str(exc),
            )
            return
        old = sf.read()
        if old is not None and runstate.sentinel_alive(old):
            why = (
                f"another Sentinel (pid {old.sentinel_pid}) supervises the engine on port "
                f"{self.engine_cfg.port} (state file {sf.path}); stop it first, or use another "
                "engine.port or lifecycle.runtime_dir"
            )
            log.error("cannot start", reason=why)
            self.status.set_lifecycle(Lifecycle.failed, why)
            self._launch_at = None
            self._exit_code = 2
            return
        if old is not None:
            await self._kill_earlier(old)
        self._state_file = sf
        self._write_state()
        self._start_guard(sf.path)

    async def _kill_earlier(self, old: runstate.RunState) -> None:
        procs = runstate.leftovers(old)
        if not procs:
            return
        pids = [p["pid"] for p in procs]
        members = []
        for p in procs:
            try:
                proc = psutil.Process(p["pid"])
                members.append(proctree.Member(p["pid"], proc.create_time(), p["role"], proc))
            except psutil.Error:
                continue
        report = await proctree.terminate(
            lambda: [m for m in members if runstate.start_ticks(m.pid) is not None],
            0.0,
            self._reap,
            kill_wait_s=self.life.unkillable_after_s,
        )
        self.status.orphans_killed += len(set(report.killed))
        self._gpu_suspects.update(pids)
        log.warning(
            "killed engine processes an earlier Sentinel left behind",
            earlier_sentinel_pid=old.sentinel_pid,
            pids=pids,
            commands=[" ".join(command.redacted_argv(p["cmdline"]))[:200] for p in procs],
        )
        if report.survivors:
            roles = {p["pid"]: str(p["role"]) for p in procs}
            self._mark_unkillable(0, report.survivors, roles)

    def _start_guard(self, state_path: Path) -> None:
        if not self._subreaper:
            return  # not Linux, or no prctl: no pdeathsig either; the state file remains
        r, w = os.pipe()
        try:
            self._guard_proc = subprocess.Popen(  # noqa: S603
                [sys.executable, "-S", str(GUARD_SCRIPT), str(state_path)],
                stdin=r,
                stdout=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            os.close(w)
            log.warning("cannot start the guard process", error=str(exc))
            return
        finally:
            os.close(r)
        self._guard_fd = w  # not inheritable: only Sentinel holds it; EOF = Sentinel gone
        log.info("guard started", pid=self._guard_proc.pid, state_file=str(state_path))

    def _write_state(self) -> None:
        sf = self._state_file
        if sf is None:
            return
        procs = []
        for gen in self._gens:
            for m in list(gen.tree.members.values()):
                key = (m.pid, m.create_time)
                cached = self._ticks.get(key)
                if cached is None:
                    ticks = runstate.start_ticks(m.pid)
                    if ticks is None:
                        continue
                    try:
                        cmdline = m.proc.cmdline()
                    except psutil.Error:
                        cmdline = []
                    cached = self._ticks[key] = (ticks, cmdline)
                procs.append(runstate.Recorded(m.pid, cached[0], m.role, gen.number, cached[1]))
        live = {(m.pid, m.create_time) for g in self._gens for m in g.tree.members.values()}
        for key in [k for k in self._ticks if k not in live]:
            del self._ticks[key]
        try:
            sf.write(runstate.RunState(os.getpid(), runstate.start_ticks(os.getpid()), procs))
        except OSError as exc:
            log.warning("cannot write the state file", path=str(sf.path), error=str(exc))

    def _release_runtime_state(self) -> None:
        """A clean exit: nothing of the engine is left, so the state file goes, then the
        guard is told (EOF) and finds nothing to do."""
        if self._state_file is not None and not any(g.tree.members for g in self._gens):
            self._state_file.remove()
        if self._guard_fd is not None:
            os.close(self._guard_fd)
            self._guard_fd = None
        if self._guard_proc is not None:
            try:
                self._guard_proc.wait(2)
            except subprocess.TimeoutExpired:
                log.warning("the guard did not exit", pid=self._guard_proc.pid)

    async def _gpu_released(self) -> bool:
        """Before a launch: GPU memory held by processes of earlier generations (or of an
        earlier Sentinel) must be released, waiting up to lifecycle.gpu_release_timeout_s.
        False (and state ``failed`` naming pids and memory) when it is not."""
        if self.gpu_processes is None or not self._gpu_suspects:
            return True
        deadline = time.monotonic() + self.life.gpu_release_timeout_s
        while True:
            try:
                rows = await asyncio.to_thread(self.gpu_processes)
            except (OSError, RuntimeError, ValueError) as exc:
                log.warning("listing GPU processes failed", error=str(exc))
                return True
            held = [(pid, gpu, used) for pid, gpu, used in rows if pid in self._gpu_suspects]
            if not held:
                self._gpu_suspects.clear()
                return True
            if time.monotonic() >= deadline:
                what = ", ".join(
                    f"pid {pid} holds {used / 2**20:.0f} MiB on GPU {gpu}"
                    for pid, gpu, used in held
                )
                self._enter_failed(
                    f"GPU memory of an earlier engine generation is not released after "
                    f"{self.life.gpu_release_timeout_s:g}s ({what}); the engine is not launched "
                    "(SIGHUP or `sentinel restart` tries again)"
                )
                return False
            await asyncio.sleep(GPU_RELEASE_POLL_S)

    # ---- last resort -----------------------------------------------------------------
    def _kill_everything_now(self) -> None:
        """run() is leaving (normally everything is gone already): SIGKILL what is left."""
        for gen in self._gens:
            for pid in list(gen.pidfds):
                self._unwatch(gen, pid)
            for member in self._members(gen):
                proctree.signal_member(member, signal.SIGKILL)
                log.warning("killed on exit", pid=member.pid, generation=gen.number)
            for task in gen.readers:
                task.cancel()
            if gen.load_task is not None:
                gen.load_task.cancel()
        self._reap()


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _roles(gen: _Generation) -> dict[int, str]:
    return {pid: m.role for pid, m in gen.tree.members.items()}
