"""py-spy as a subprocess: find it, check ptrace permission once, dump one process.

A dump is bounded by ``timeout_s`` (the py-spy process is killed after it). A
blocking dump suspends the process while it reads it; a process that cannot be
suspended (already SIGSTOPped, for one) is read again with ``--nonblocking``,
and the result says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from sentinel.config.schema import DumpConfig

PTRACE_HELP = (
    "py-spy needs ptrace permission: run Sentinel as the engine's user with "
    "kernel.yama.ptrace_scope 0 (sysctl kernel.yama.ptrace_scope=0), or give it "
    "CAP_SYS_PTRACE (docker run --cap-add SYS_PTRACE; Kubernetes: "
    "securityContext.capabilities.add: [SYS_PTRACE])"
)
MISSING_HELP = (
    "py-spy is not installed: pip install py-spy (or set watchdogs.dump.py_spy to its path)"
)
_THREAD = re.compile(r"^Thread (0x[0-9A-Fa-f]+|\d+) \(([^)]*)\)(?::\s*\"?([^\"]*)\"?)?")
_MAX_OUTPUT = 4 * 1024 * 1024


def find_py_spy(configured: str | None) -> str | None:
    if configured:
        path = shutil.which(configured)
        return path
    beside = Path(sys.executable).parent / "py-spy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("py-spy")


@dataclass
class DumpResult:
    pid: int
    role: str
    ok: bool
    seconds: float
    text: str = ""
    error: str = ""  # why there is no dump (or what was degraded)
    outcome: str = "ok"  # ok | failed | timeout | unavailable | gone
    nonblocking: bool = False
    native: bool = False
    threads: list[dict[str, object]] = field(default_factory=list)

    def top_frames(self, per_thread: int = 3, threads: int = 4) -> list[str]:
        """The innermost frames of the busiest threads, for the log."""
        ranked = sorted(
            self.threads, key=lambda t: (0 if "active" in str(t["state"]) else 1, t["index"])
        )
        out = []
        for t in ranked[:threads]:
            frames = list(t["frames"])[:per_thread]  # type: ignore[call-overload]
            out.append(f"{t['name'] or t['id']} ({t['state']}): " + " <- ".join(frames))
        return out

    def record(self) -> dict[str, object]:
        return {
            "pid": self.pid,
            "role": self.role,
            "ok": self.ok,
            "outcome": self.outcome,
            "seconds": round(self.seconds, 3),
            "error": self.error,
            "nonblocking": self.nonblocking,
            "native": self.native,
            "top_frames": self.top_frames(),
        }


def parse_threads(text: str) -> list[dict[str, object]]:
    """py-spy dump's text: ``Thread <id> (<state>): "<name>"`` then indented frames."""
    threads: list[dict[str, object]] = []
    cur: dict[str, object] | None = None
    for line in text.splitlines():
        m = _THREAD.match(line)
        if m:
            cur = {
                "id": m.group(1),
                "state": m.group(2),
                "name": m.group(3) or "",
                "frames": [],
                "index": len(threads),
            }
            threads.append(cur)
        elif cur is not None and line.startswith("    ") and line.strip():
            cur["frames"].append(line.strip())  # type: ignore[attr-defined]
    return threads


class PySpy:
    def __init__(self, cfg: DumpConfig) -> None:
        self.cfg = cfg
        self.executable = find_py_spy(cfg.py_spy)
        # None until checked; then (ok, detail)
        self.permission: tuple[bool, str] | None = None

    @property
    def available(self) -> bool:
        return self.executable is not None

    def describe(self) -> dict[str, object]:
        ok, detail = self.permission if self.permission else (None, "not checked yet")
        if not self.available:
            ok, detail = False, MISSING_HELP
        return {
            "py_spy": self.executable,
            "ptrace_ok": ok,
            "detail": detail,
            "native": self.cfg.native,
            "nonblocking": self.cfg.nonblocking,
        }

    async def check_permission(self) -> tuple[bool, str]:
        """Dump a short-lived child Python: the same permission an engine dump needs
        (a sibling process, not a child of py-spy)."""
        if not self.available:
            self.permission = (False, MISSING_HELP)
            return self.permission
        child = subprocess.Popen(
            [sys.executable, "-c", "import time\ntime.sleep(30)"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            await asyncio.sleep(0.3)  # let the interpreter come up
            res = await self.dump(child.pid, "probe", native=False, nonblocking=False)
        finally:
            child.kill()
            await asyncio.to_thread(child.wait)
        if res.ok:
            self.permission = (True, "py-spy can read the engine's processes")
        else:
            self.permission = (False, f"{res.error}")
        return self.permission

    async def dump(
        self,
        pid: int,
        role: str,
        *,
        native: bool | None = None,
        nonblocking: bool | None = None,
        timeout_s: float | None = None,
    ) -> DumpResult:
        native = self.cfg.native if native is None else native
        nonblocking = self.cfg.nonblocking if nonblocking is None else nonblocking
        if native:
            nonblocking = False  # py-spy refuses the combination
        timeout = self.cfg.timeout_s if timeout_s is None else timeout_s
        t0 = time.monotonic()
        res = await self._run(pid, role, native, nonblocking, timeout)
        if not res.ok and not nonblocking and res.outcome == "failed" and _cannot_suspend(res):
            left = max(0.5, timeout - (time.monotonic() - t0))
            retry = await self._run(pid, role, False, True, left)
            if retry.ok:
                retry.error = (
                    "the process could not be suspended (stopped or traced): read without "
                    "pausing it (--nonblocking)" + ("; native frames left out" if native else "")
                )
                res = retry
        res.seconds = time.monotonic() - t0
        return res

    async def _run(
        self, pid: int, role: str, native: bool, nonblocking: bool, timeout: float
    ) -> DumpResult:
        res = DumpResult(pid, role, False, 0.0, native=native, nonblocking=nonblocking)
        if self.executable is None:
            res.outcome, res.error = "unavailable", MISSING_HELP
            return res
        argv = [self.executable, "dump", "--pid", str(pid)]
        if native:
            argv.append("--native")
        if nonblocking:
            argv.append("--nonblocking")
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            res.outcome, res.error = "unavailable", f"cannot run {self.executable}: {exc}"
            return res
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(Exception):
                await proc.wait()
            res.outcome = "timeout"
            res.error = f"py-spy did not finish within {timeout:g}s (watchdogs.dump.timeout_s)"
            return res
        text = out[:_MAX_OUTPUT].decode(errors="replace")
        if proc.returncode == 0 and text.strip():
            res.ok, res.text, res.threads = True, text, parse_threads(text)
            return res
        res.outcome = "failed"
        res.error = _explain(pid, err.decode(errors="replace"), proc.returncode)
        res.text = text
        return res


def _cannot_suspend(res: DumpResult) -> bool:
    return "suspend" in res.error.lower() or "waitpid" in res.error.lower()


def _explain(pid: int, stderr: str, code: int | None) -> str:
    first = next(
        (ln.strip() for ln in stderr.splitlines() if ln.strip() and "backtrace" not in ln.lower()),
        "",
    )
    causes = [ln.strip() for ln in stderr.splitlines() if re.match(r"\s+\d+: ", ln)][:3]
    low = stderr.lower()
    if "permission denied" in low or "operation not permitted" in low or "eperm" in low:
        return f"permission denied reading pid {pid}: {PTRACE_HELP}"
    if "no such process" in low or "esrch" in low:
        return f"pid {pid} is gone"
    msg = "; ".join([first, *causes]) if first else f"py-spy exited {code}"
    return msg[:500]
