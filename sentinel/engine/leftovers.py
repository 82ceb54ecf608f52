"""Nothing of an earlier engine may survive a launch (issue 16): earlier generations'
leftovers and GPU holders, the runtime state file and the guard process, an earlier
Sentinel's engine, and waiting for GPU memory to be released before a launch."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from sentinel.engine import command, proctree, runstate
from sentinel.engine.generation import roles
from sentinel.logs import get_logger
from sentinel.state import Lifecycle

log = get_logger("sentinel.engine")

GUARD_SCRIPT = Path(__file__).with_name("guard.py")
GPU_RELEASE_POLL_S = 0.5


class LeftoversMixin:
    """Mixed into Supervisor; uses its cfg, life, engine_cfg, status, gpu_processes, _gens,
    _current, _history and the reaping/unkillable helpers."""

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
                    self._mark_unkillable(gen.number, report.survivors, roles(gen))
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
