"""Finding the processes of an engine Sentinel did not launch (engine.mode: attach).

In a pod with ``shareProcessNamespace`` Sentinel sees the engine container's processes.
The API server is found by its pid file or by its command line (engine.attach.api_server_match);
its descendants get their role from vLLM's process titles (``VLLM::EngineCore``,
``VLLM::Worker``). Selection is a pure function over a snapshot, so that the edge cases
(none, several, a stale pid file) are tested with plain data.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Callable, Iterable
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
    # the API server's tree listens on the engine URL's port (or the operator named it in
    # a pid file that passed the same check): the only engine recovery may signal
    verified: bool = False

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


Listens = Callable[[int], bool | None]  # pid -> listens on the port (None: cannot tell)


def select(
    procs: Iterable[Proc],
    cfg: AttachConfig,
    port: int | None,
    *,
    pid_from_file: int | None = None,
    exclude: Iterable[int] = (),
    exclude_tree: int | None = None,
    listens: Listens | None = None,
) -> Discovery:
    """Choose the engine's API server among ``procs`` and list it with its descendants.

    ``exclude``: Sentinel itself and its ancestors (a shell whose command line names vLLM
    must not be taken for the engine); ``exclude_tree``: Sentinel's pid, whose descendants
    (py-spy, any helper it runs) are never the engine either, nor ever listed among its
    processes. ``listens``: whether a pid listens on ``port``; a candidate
    whose tree is seen not to listen there (a shell, ``pgrep -f``, a ``kubectl exec``
    session, another engine) is not taken, and only a tree seen listening is ``verified``,
    the one state in which recovery may signal it."""
    table = {p.pid: p for p in procs}
    skip = set(exclude)
    if exclude_tree is not None:
        skip |= {exclude_tree} | {p.pid for p in _descendants(exclude_tree, table)}

    def serves(p: Proc) -> bool | None:
        if listens is None or port is None:
            return None
        unknown = False
        for x in (p, *_descendants(p.pid, table)):  # the API server first: it holds the port
            got = listens(x.pid)
            if got:
                return True
            unknown = unknown or got is None
        return None if unknown else False

    if pid_from_file is not None:
        lead = table.get(pid_from_file)
        if lead is None:
            why = f"the pid {pid_from_file} in engine.attach.pid_file is not running"
            return Discovery(problem=why)
        if lead.pid in skip:
            why = (
                f"the pid {pid_from_file} in engine.attach.pid_file is Sentinel's own "
                "(itself, an ancestor or a child): never taken for the engine"
            )
            return Discovery(problem=why)
        chosen = [lead]
    else:
        pats = [re.escape(m) for m in cfg.api_server_match]
        rx = re.compile("|".join(pats))
        chosen = [p for p in table.values() if p.pid not in skip and rx.search(" ".join(p.cmdline))]
        # a match inside an API server's tree (a vLLM child, a wrapper's child) is its own
        lead_pids = {p.pid for p in chosen}
        chosen = [p for p in chosen if not _has_ancestor(p, lead_pids, table)]
    serving = {p.pid: serves(p) for p in chosen}
    if pid_from_file is None and chosen:
        listening = [p for p in chosen if serving[p.pid] is True]
        if listening:
            chosen = listening
        else:
            deaf = sorted(p.pid for p in chosen if serving[p.pid] is False)
            chosen = [p for p in chosen if serving[p.pid] is not False]
            if not chosen:
                why = (
                    f"pid {', '.join(map(str, deaf))} matches engine.attach.api_server_match "
                    f"but does not listen on port {port} (yet): not taken for the engine"
                )
                return Discovery(problem=why, candidates=deaf)
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
    if (
        pid_from_file is None
        and port is not None
        and named is not None
        and named != port
        and serving[lead.pid] is not True
    ):
        why = (
            f"the only process matching engine.attach.api_server_match (pid {lead.pid}) "
            f"serves port {named}, not the engine URL's {port}: not taken for the engine"
        )
        return Discovery(problem=why, candidates=candidates)
    members = [Found(lead.pid, "api_server", lead.create_time)]
    for p in _descendants(lead.pid, table):
        if p.pid in skip:  # Sentinel below the engine's process (never signalled)
            continue
        members.append(Found(p.pid, role_of(p.cmdline, cfg), p.create_time))
    verified = serving[lead.pid] is True
    problem = None
    if not verified and listens is not None and port is not None:
        problem = (
            f"pid {lead.pid} is taken for the engine's API server but is not seen listening "
            f"on port {port}: telemetry only, no recovery (give Sentinel SYS_PTRACE or the "
            "engine's uid)"
            if serving[lead.pid] is None
            else f"the pid {lead.pid} in engine.attach.pid_file does not listen on port {port} "
            "(yet): telemetry only, no recovery"
        )
    return Discovery(members=members, candidates=candidates, verified=verified, problem=problem)


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


def listens_on(port: int) -> Listens:
    """pid -> whether it holds a TCP socket listening on ``port`` (None: its sockets cannot
    be read: another uid without SYS_PTRACE)."""

    def check(pid: int) -> bool | None:
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.AccessDenied:
            return None
        except psutil.Error:
            return False  # gone
        return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                   for c in conns)  # fmt: skip

    return check


def is_local_host(host: str | None) -> bool:
    """Whether ``host`` (a URL's) is this machine: loopback, a name for it, or an address
    of one of its interfaces (in a pod: the pod's own IP)."""
    if host is None:
        return True
    host = host.strip("[]").lower()
    if host in ("localhost", "0.0.0.0", "::") or host == socket.gethostname().lower():
        return True
    try:
        if ipaddress.ip_address(host).is_loopback:
            return True
    except ValueError:
        return False  # another name: another machine (a Service, a remote host)
    try:
        addrs = {a.address.split("%")[0] for nic in psutil.net_if_addrs().values() for a in nic}
    except OSError:
        return False
    return host in addrs


def discover(cfg: AttachConfig, port: int | None, host: str | None = None) -> Discovery:
    """One look at the machine (blocking: run it in a thread). ``host``: the engine URL's;
    an engine on another machine has no processes here (a local process serving the same
    port number is not it)."""
    if not is_local_host(host):
        why = (
            f"engine.attach.base_url's host {host} is not this machine: no engine process "
            "can be found or recovered here (probes, scrape and proxy still work)"
        )
        return Discovery(problem=why)
    pid_from_file = None
    if cfg.pid_file is not None:
        pid_from_file, why = read_pid_file(cfg.pid_file)
        if why is not None:
            return Discovery(problem=why)
    return select(
        snapshot(),
        cfg,
        port,
        pid_from_file=pid_from_file,
        exclude=own_lineage(),
        exclude_tree=os.getpid(),
        listens=listens_on(port) if port is not None else None,
    )
