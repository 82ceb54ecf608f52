"""Finding the processes of an engine Sentinel did not launch (engine.mode: attach).

In a pod with ``shareProcessNamespace`` Sentinel sees the engine container's processes.
The API server is found by its pid file or by its command line (engine.attach.api_server_match);
its descendants get their role from vLLM's process titles (``VLLM::EngineCore``,
``VLLM::Worker``). Selection is a pure function over a snapshot, so that the edge cases
(none, several, a stale pid file) are tested with plain data.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from sentinel.config.schema import AttachConfig


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    create_time: float
    cmdline: tuple[str, ...]


@dataclass(frozen=True)
class Found:
    pid: int
    role: str  # api_server | engine_core | worker | other
    create_time: float


@dataclass
class Discovery:
    members: list[Found] = field(default_factory=list)  # the API server first
    problem: str | None = None  # why no engine was chosen (None: found, or nothing there)
    candidates: list[int] = field(default_factory=list)  # API server candidates seen

    @property
    def api_server(self) -> Found | None:
        return self.members[0] if self.members else None

    @property
    def identity(self) -> tuple[int, float] | None:
        lead = self.api_server
        return (lead.pid, lead.create_time) if lead is not None else None


def snapshot() -> list[Proc]:
    """Every live process this Sentinel can see (zombies left out)."""
    out: list[Proc] = []
    for p in psutil.process_iter(["pid", "ppid", "create_time", "cmdline", "status"]):
        info = p.info
        if info.get("status") == psutil.STATUS_ZOMBIE or info.get("create_time") is None:
            continue
        out.append(
            Proc(info["pid"], info["ppid"] or 0, info["create_time"], tuple(info["cmdline"] or ()))
        )
    return out


def read_pid_file(path: Path) -> tuple[int | None, str | None]:
    """(pid, None), or (None, why not)."""
    try:
        text = path.read_text().strip()
    except OSError as exc:
        return None, f"cannot read engine.attach.pid_file {path}: {exc.strerror or exc}"
    if not text.isdigit() or int(text) <= 0:
        return None, f"engine.attach.pid_file {path} holds {text[:40]!r}, not a pid"
    return int(text), None


def port_named(cmdline: tuple[str, ...]) -> int | None:
    """The port a command line gives with --port N / --port=N (the last one), or None."""
    found = None
    for i, arg in enumerate(cmdline):
        value = arg[len("--port=") :] if arg.startswith("--port=") else None
        if arg == "--port" and i + 1 < len(cmdline):
            value = cmdline[i + 1]
        if value is not None and value.isdigit():
            found = int(value)
    return found


def role_of(cmdline: tuple[str, ...], cfg: AttachConfig) -> str:
    title = cmdline[0] if cmdline else ""
    if title.startswith(cfg.engine_core_title):
        return "engine_core"
    if title.startswith(cfg.worker_title):
        return "worker"
    return "other"


def select(
    procs: Iterable[Proc],
    cfg: AttachConfig,
    port: int | None,
    *,
    pid_from_file: int | None = None,
    exclude: Iterable[int] = (),
) -> Discovery:
    """Choose the engine's API server among ``procs`` and list it with its descendants.

    ``exclude``: Sentinel itself and its ancestors (a shell whose command line names vLLM
    must not be taken for the engine)."""
    table = {p.pid: p for p in procs}
    skip = set(exclude)
    if pid_from_file is not None:
        lead = table.get(pid_from_file)
        if lead is None:
            why = f"the pid {pid_from_file} in engine.attach.pid_file is not running"
            return Discovery(problem=why)
        chosen = [lead]
    else:
        pats = [re.escape(m) for m in cfg.api_server_match]
        rx = re.compile("|".join(pats))
        chosen = [p for p in table.values() if p.pid not in skip and rx.search(" ".join(p.cmdline))]
        # a match inside an API server's tree (a vLLM child, a wrapper's child) is its own
        lead_pids = {p.pid for p in chosen}
        chosen = [p for p in chosen if not _has_ancestor(p, lead_pids, table)]
        if len(chosen) > 1 and port is not None:
            on_port = [p for p in chosen if port_named(p.cmdline) == port]
            if on_port:
                chosen = on_port
    candidates = sorted(p.pid for p in chosen)
    if not chosen:
        return Discovery()
    if len(chosen) > 1:
        why = (
            f"{len(chosen)} processes match engine.attach.api_server_match (pids "
            f"{', '.join(map(str, candidates))}) and none alone names port {port}; "
            "set engine.attach.pid_file or a narrower api_server_match"
        )
        return Discovery(problem=why, candidates=candidates)
    lead = chosen[0]
    named = port_named(lead.cmdline)
    if pid_from_file is None and port is not None and named is not None and named != port:
        why = (
            f"the only process matching engine.attach.api_server_match (pid {lead.pid}) "
            f"serves port {named}, not the engine URL's {port}: not taken for the engine"
        )
        return Discovery(problem=why, candidates=candidates)
    members = [Found(lead.pid, "api_server", lead.create_time)]
    for p in _descendants(lead.pid, table):
        members.append(Found(p.pid, role_of(p.cmdline, cfg), p.create_time))
    return Discovery(members=members, candidates=candidates)


def _has_ancestor(p: Proc, pids: set[int], table: dict[int, Proc]) -> bool:
    seen: set[int] = set()
    cur = table.get(p.ppid)
    while cur is not None and cur.pid not in seen:
        if cur.pid in pids:
            return True
        seen.add(cur.pid)
        cur = table.get(cur.ppid)
    return False


def _descendants(pid: int, table: dict[int, Proc]) -> list[Proc]:
    children: dict[int, list[Proc]] = {}
    for p in table.values():
        children.setdefault(p.ppid, []).append(p)
    out: list[Proc] = []
    todo = [pid]
    while todo:
        for child in sorted(children.get(todo.pop(0), ()), key=lambda c: c.pid):
            if child.pid != pid and child not in out:
                out.append(child)
                todo.append(child.pid)
    return out


def own_lineage() -> set[int]:
    """This process and its ancestors."""
    pids = {os.getpid()}
    try:
        pids.update(p.pid for p in psutil.Process().parents())
    except psutil.Error:
        pass
    return pids


def discover(cfg: AttachConfig, port: int | None) -> Discovery:
    """One look at the machine (blocking: run it in a thread)."""
    pid_from_file = None
    if cfg.pid_file is not None:
        pid_from_file, why = read_pid_file(cfg.pid_file)
        if why is not None:
            return Discovery(problem=why)
    return select(snapshot(), cfg, port, pid_from_file=pid_from_file, exclude=own_lineage())
