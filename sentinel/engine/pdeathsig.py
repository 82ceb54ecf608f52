"""Exec wrapper for the engine's API server: ``python -S pdeathsig.py PARENT_PID -- CMD...``.

Sets ``PR_SET_PDEATHSIG = SIGKILL`` (the kernel kills this process the moment the thread
that started it, Sentinel's main thread, dies) and execs the engine command in place:
same pid, the setting survives the exec. A wrapper rather than ``preexec_fn``, which is
not safe in a process with threads. If Sentinel died before the setting took effect,
it exits at once. vLLM's EngineCore and Workers are children of the API server and do
not inherit it: the guard (``guard.py``) and the next start cover them.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        sys.stderr.write("usage: pdeathsig.py PARENT_PID -- COMMAND [ARG...]\n")
        return 2
    parent = int(argv[1])
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the guard and the state file still cover it
    if os.getppid() != parent:
        return 1  # Sentinel is already gone: do not start an engine nobody guards
    cmd = argv[3:]
    try:
        os.execvp(cmd[0], cmd)
    except OSError as exc:
        sys.stderr.write(f"cannot start the engine command {cmd[0]!r}: {exc.strerror}\n")
        return 127
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv))
