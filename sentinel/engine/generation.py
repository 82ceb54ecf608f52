"""One engine generation (its Popen, process tree, pidfds) and the supervisor's part
that reaps and watches generations' processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field

from sentinel.engine import diagnose as dx
from sentinel.engine import proctree
from sentinel.logs import get_logger
from sentinel.state import ProcessInfo

log = get_logger("sentinel.engine")

SCAN_STARTING_S = 1.0  # while the tree is still growing
SCAN_LOADED_S = 5.0  # once loaded; deaths are seen at once through pidfds anyway
CORE_ROLES = ("engine_core", "worker")


@dataclass
class Generation:
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


def signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def roles(gen: Generation) -> dict[int, str]:
    return {pid: m.role for pid, m in gen.tree.members.items()}


class WatchMixin:
    """Reaping (waitpid(-1)), the periodic tree scan and pidfd watches of the Supervisor's
    generations. Mixed into Supervisor; uses its _gens, _current, _loop, _subreaper,
    status and _put."""

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

    def _watch(self, gen: Generation, member: proctree.Member) -> None:
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

    def _on_pidfd(self, gen: Generation, member: proctree.Member) -> None:
        self._unwatch(gen, member.pid)
        self._member_gone(gen, member)
        self._put(("child",))

    def _unwatch(self, gen: Generation, pid: int) -> None:
        fd = gen.pidfds.pop(pid, None)
        if fd is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(fd)
        os.close(fd)

    def _member_gone(self, gen: Generation, member: proctree.Member) -> None:
        if (
            gen is self._current
            and not gen.ending
            and member.role in CORE_ROLES
            and (member.role, member.pid) not in gen.dead_core
        ):
            gen.dead_core.append((member.role, member.pid))

    def _members(self, gen: Generation) -> list[proctree.Member]:
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
