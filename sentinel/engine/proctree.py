"""Process-tree ownership: subreaper, reaping, finding a generation's processes, killing.

A *generation* is one launch of the engine: its leader (the API server) runs in
a new session, so every process it starts shares the leader's session id unless
it calls setsid itself. Sentinel marks itself a child subreaper, so descendants
whose parent dies are re-parented to Sentinel instead of init and stay in its
subtree. A process is ours when it is a descendant of Sentinel AND either
belongs to a generation's session or was seen earlier as a member of one;
processes are identified by (pid, create_time) so a reused pid is never
mistaken for one of ours.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import psutil

PR_SET_CHILD_SUBREAPER = 36
# create_time has a granularity of one clock tick; allow for it
_CTIME_SLACK_S = 0.05


def set_child_subreaper() -> bool:
    """Mark this process a child subreaper (Linux >= 3.4). False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
    except OSError:
        return False
    return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def reap_children() -> list[tuple[int, int]]:
    """Reap every exited child now: [(pid, exit code)]; a negative code is -signal."""
    out = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        out.append((pid, os.waitstatus_to_exitcode(status)))
    return out


def exit_code_for_shell(code: int | None) -> int:
    """A child's exit code as a shell reports it: 128+N when signal N ended it."""
    if code is None:
        return 0
    return 128 - code if code < 0 else code


def role_from_cmdline(cmdline: list[str]) -> str | None:
    """vLLM retitles its processes VLLM::EngineCore, VLLM::Worker_TP0, ..."""
    title = cmdline[0] if cmdline else ""
    if "::" not in title:
        return None
    name = title.split("::", 1)[1].split()[0].lower() if title.split("::", 1)[1] else ""
    if name.startswith("enginecore"):
        return "engine_core"
    if name.startswith("worker"):
        return "worker"
    if name.startswith("apiserver"):
        return "api_server"
    return "other"


@dataclass
class Member:
    pid: int
    create_time: float
    role: str
    proc: psutil.Process


@dataclass
class GenerationTree:
    """The processes of one generation that Sentinel knows about."""

    number: int
    leader_pid: int
    leader_ctime: float
    members: dict[int, Member] = field(default_factory=dict)

    @property
    def sid(self) -> int:
        return self.leader_pid

    def owns(self, proc: psutil.Process, ctime: float) -> bool:
        known = self.members.get(proc.pid)
        if known is not None:
            return abs(known.create_time - ctime) < _CTIME_SLACK_S
        if ctime + _CTIME_SLACK_S < self.leader_ctime:
            return False  # older than the generation: cannot be its child
        if proc.pid == self.leader_pid:
            return abs(ctime - self.leader_ctime) < _CTIME_SLACK_S
        try:
            return os.getsid(proc.pid) == self.sid
        except OSError:
            return False

    def role_of(self, pid: int, cmdline: list[str]) -> str:
        if pid == self.leader_pid:
            return "api_server"
        return role_from_cmdline(cmdline) or "other"


_TITLED = ("engine_core", "worker")


def _parent_role(proc: psutil.Process) -> str | None:
    try:
        return role_from_cmdline(psutil.Process(proc.ppid()).cmdline())
    except psutil.Error:
        return None


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def candidates(whole_system: bool) -> list[psutil.Process]:
    """Processes that could be ours: Sentinel's descendants (with the subreaper every
    engine process stays among them), or every process when there is no subreaper."""
    if whole_system:
        me = os.getpid()
        return [p for p in psutil.process_iter() if p.pid != me]
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def scan(trees: Iterable[GenerationTree], whole_system: bool) -> list[Member]:
    """Refresh every tree's members from the live process table; return the members
    that are new or whose role changed. Members that have exited are dropped."""
    trees = list(trees)
    new: list[Member] = []
    seen: set[tuple[int, int]] = set()
    for proc in candidates(whole_system):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            ctime = proc.create_time()
            for tree in trees:
                if tree.owns(proc, ctime):
                    seen.add((tree.number, proc.pid))
                    known = tree.members.get(proc.pid)
                    if known is None or known.role == "other":
                        # vLLM retitles a process a little after it starts: look again
                        try:
                            cmdline = proc.cmdline()
                        except psutil.Error:
                            cmdline = []
                        role = tree.role_of(proc.pid, cmdline)
                        if role in _TITLED and _parent_role(proc) == role:
                            # a fork of a titled process carries its title until it execs
                            # or retitles: vLLM's EngineCore runs helper commands and forks
                            # its Workers so. Not the EngineCore itself: its exit must not
                            # fail the generation (looked at again on the next scan)
                            role = "other"
                        if known is None or role != known.role:
                            m = Member(proc.pid, ctime, role, proc)
                            tree.members[proc.pid] = m
                            new.append(m)
                    break
        except psutil.Error:
            continue
    for tree in trees:
        for pid in [p for p in tree.members if (tree.number, p) not in seen]:
            del tree.members[pid]
    return new


def signal_member(member: Member, sig: int) -> bool:
    """Send sig to a member if it is still the same process (pid-reuse safe)."""
    try:
        if not member.proc.is_running():
            return False
        member.proc.send_signal(sig)
        return True
    except psutil.Error:
        return False


@dataclass
class KillReport:
    termed: list[int] = field(default_factory=list)
    killed: list[int] = field(default_factory=list)
    survivors: list[int] = field(default_factory=list)
    seconds: float = 0.0


async def terminate(
    find: Callable[[], list[Member]],
    grace_s: float,
    reap: Callable[[], None],
    escalate: Callable[[], bool] = lambda: False,
    kill_wait_s: float = 5.0,
    poll_s: float = 0.02,
    first: Callable[[Member], bool] | None = None,
) -> KillReport:
    """TERM every process ``find`` returns (again for newcomers), wait up to grace_s
    for all to go, then KILL the rest and wait up to kill_wait_s.

    ``reap`` is called while waiting so exited children do not linger as zombies;
    ``escalate()`` returning True skips the rest of the grace (a second signal).
    ``first``: the members it selects (vLLM's API server) are TERMed alone first, and
    the others only once those are gone or the grace ends: the API server then shuts
    its EngineCore and Workers down in order, as vLLM drains best."""
    t0 = time.monotonic()
    report = KillReport()
    termed: set[tuple[int, float]] = set()
    deadline = t0 + grace_s
    while first is not None:
        reap()
        leaders = [m for m in find() if first(m) and _alive(m.proc)]
        if not leaders or time.monotonic() >= deadline or escalate():
            break
        for m in leaders:
            if (m.pid, m.create_time) not in termed and signal_member(m, signal.SIGTERM):
                signal_member(m, signal.SIGCONT)
                termed.add((m.pid, m.create_time))
                report.termed.append(m.pid)
        await asyncio.sleep(poll_s)
    while True:
        reap()
        live = [m for m in find() if _alive(m.proc)]
        if not live:
            break
        if time.monotonic() >= deadline or escalate():
            break
        for m in live:
            if (m.pid, m.create_time) not in termed and signal_member(m, signal.SIGTERM):
                # a stopped process (SIGSTOP, debugger, freezer) acts on TERM only once
                # continued, as systemd does
                signal_member(m, signal.SIGCONT)
                termed.add((m.pid, m.create_time))
                report.termed.append(m.pid)
        await asyncio.sleep(poll_s)
    kill_deadline = time.monotonic() + kill_wait_s
    killed: set[tuple[int, float]] = set()
    while True:
        reap()
        live = [m for m in find() if _alive(m.proc)]
        if not live:
            break
        if time.monotonic() >= kill_deadline:
            report.survivors = [m.pid for m in live]
            break
        for m in live:
            if (m.pid, m.create_time) not in killed and signal_member(m, signal.SIGKILL):
                killed.add((m.pid, m.create_time))
                report.killed.append(m.pid)
        await asyncio.sleep(poll_s)
    reap()
    report.seconds = time.monotonic() - t0
    return report


def describe_stuck(pid: int, proc_root: str = "/proc") -> dict[str, str | int]:
    """Why a process may not die: its state (``D`` = uninterruptible sleep) and, where
    readable, the kernel function it waits in (``/proc/PID/wchan``)."""
    state, wchan = "?", "unknown"
    try:
        raw = open(f"{proc_root}/{pid}/stat", "rb").read()  # noqa: SIM115
        state = raw[raw.rindex(b")") + 2 :].split()[0].decode()
    except (OSError, ValueError, IndexError):
        state = "gone"
    try:
        with open(f"{proc_root}/{pid}/wchan") as f:
            wchan = f.read().strip() or "unknown"
        if wchan == "0":
            wchan = "running"
    except OSError:
        pass
    names = {"D": "uninterruptible sleep", "Z": "zombie", "T": "stopped", "R": "running"}
    return {"pid": pid, "state": state, "state_name": names.get(state, state), "wchan": wchan}
