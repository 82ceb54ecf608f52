"""What this Sentinel has running, on disk, so that nothing outlives it unnoticed.

The state file (``<runtime dir>/engine-<engine port>.json``) lists Sentinel's own pid and
every engine process it knows (pid, kernel start time in clock ticks, command line, role,
generation). It is rewritten whenever the engine's process tree changes and removed on a
clean exit. Two things read it:

- the guard (``sentinel/engine/guard.py``), a tiny process that outlives a SIGKILLed
  Sentinel by a moment: it kills what the file lists, at once;
- the next ``sentinel run``: it kills what an earlier Sentinel left before it launches.

A pid alone is never trusted: a process is killed only when its start time matches the
recorded one (a reused pid has a later start), or when it is in the session of a
recorded API server whose pid is not now held by a different process.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATE_VERSION = 1


def default_runtime_dir() -> Path:
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.access(xdg, os.W_OK):
        return Path(xdg) / "sentinel"
    run = Path("/run/sentinel")
    if run.is_dir() and os.access(run, os.W_OK):
        return run
    if os.access("/run", os.W_OK):
        return run
    return Path(tempfile.gettempdir()) / f"sentinel-{os.getuid()}"


def start_ticks(pid: int, proc_root: str = "/proc") -> int | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22)."""
    try:
        raw = Path(proc_root, str(pid), "stat").read_bytes()
    except OSError:
        return None
    try:
        fields = raw[raw.rindex(b")") + 2 :].split()
        if fields[0] == b"Z":  # a zombie is gone for our purposes
            return None
        return int(fields[19])
    except (ValueError, IndexError):
        return None


def session_of(pid: int, proc_root: str = "/proc") -> int | None:
    try:
        raw = Path(proc_root, str(pid), "stat").read_bytes()
        return int(raw[raw.rindex(b")") + 2 :].split()[3])
    except (OSError, ValueError, IndexError):
        return None


def cmdline_of(pid: int, proc_root: str = "/proc") -> list[str]:
    try:
        raw = Path(proc_root, str(pid), "cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


@dataclass
class Recorded:
    pid: int
    start_ticks: int
    role: str
    generation: int
    cmdline: list[str] = field(default_factory=list)


@dataclass
class RunState:
    sentinel_pid: int
    sentinel_start_ticks: int | None
    processes: list[Recorded] = field(default_factory=list)
    version: int = STATE_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> RunState:
        doc = json.loads(text)
        if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION:
            raise ValueError("not a Sentinel state file of this version")
        procs = [Recorded(**p) for p in doc.get("processes", [])]
        return cls(int(doc["sentinel_pid"]), doc.get("sentinel_start_ticks"), procs)


class StateFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._last = ""

    def prepare(self) -> None:
        """Create the runtime directory (mode 0700). Raises OSError naming the problem."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not os.access(self.path.parent, os.W_OK):
            raise PermissionError(f"{self.path.parent} is not writable")

    def read(self) -> RunState | None:
        try:
            return RunState.from_json(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return None  # torn or foreign: nothing we can trust in it

    def write(self, state: RunState) -> None:
        text = state.to_json()
        if text == self._last:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.path)
        self._last = text

    def remove(self) -> None:
        self._last = ""
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def sentinel_alive(state: RunState, proc_root: str = "/proc") -> bool:
    """The Sentinel that wrote ``state`` still runs (same pid and start time)."""
    if state.sentinel_pid == os.getpid() or state.sentinel_start_ticks is None:
        return False
    return start_ticks(state.sentinel_pid, proc_root) == state.sentinel_start_ticks


def leftovers(state: RunState, proc_root: str = "/proc") -> list[dict[str, Any]]:
    """Live processes of an earlier Sentinel's engine: each recorded process whose start
    time still matches, plus the members of a recorded API server's session (see below)."""
    found: dict[int, dict[str, Any]] = {}
    sessions: set[int] = set()
    me = os.getpid()
    for rec in state.processes:
        ticks = start_ticks(rec.pid, proc_root)
        if rec.role == "api_server" and ticks in (None, rec.start_ticks):
            # the engine's session: its id is the API server's pid, which the kernel does
            # not give to another process while any member of the session lives; so
            # unless that pid now belongs to another process, its members are ours, even
            # those not yet recorded (a Worker started after the last scan)
            sessions.add(rec.pid)
        if rec.pid == me or ticks != rec.start_ticks:
            continue
        found[rec.pid] = {"pid": rec.pid, "role": rec.role, "cmdline": rec.cmdline}
    if sessions:
        try:
            pids = [int(n) for n in os.listdir(proc_root) if n.isdigit()]
        except OSError:
            pids = []
        for pid in pids:
            if pid in found or pid == me:
                continue
            if session_of(pid, proc_root) in sessions and start_ticks(pid, proc_root):
                found[pid] = {"pid": pid, "role": "session", "cmdline": cmdline_of(pid, proc_root)}
    return sorted(found.values(), key=lambda d: d["pid"])
