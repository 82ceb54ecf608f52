"""The guard: kills the engine at once when Sentinel dies without stopping it.

Started by the supervisor as ``python -S guard.py STATE_FILE`` in its own session, with
stdin the read end of a pipe only Sentinel holds open. EOF on stdin means Sentinel is
gone. A clean exit removes the state file first, so the guard finds nothing to do; a
SIGKILLed (OOM-killed, crashed) Sentinel leaves it, and the guard SIGKILLs every process
it lists whose start time still matches (``runstate.leftovers``), then removes it.

Standard library only, and ``runstate`` loaded by path: no package import, no psutil,
so it starts in milliseconds and holds a few MB.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
import time
from pathlib import Path

KILL_WAIT_S = 5.0
SENTINEL_EXIT_WAIT_S = 5.0


def _runstate():  # type: ignore[no-untyped-def]
    path = Path(__file__).with_name("runstate.py")
    spec = importlib.util.spec_from_file_location("sentinel_guard_runstate", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _say(event: str, **fields: object) -> None:
    line = {"event": event, "logger": "sentinel.guard", "level": "warning", **fields}
    try:
        sys.stderr.write(json.dumps(line) + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write("usage: guard.py STATE_FILE\n")
        return 2
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    rs = _runstate()
    path = Path(argv[1])
    stdin = sys.stdin.buffer
    while True:
        try:
            if not stdin.read(4096):
                break
        except InterruptedError:
            continue
        except OSError:
            break
    state = rs.StateFile(path).read()
    # EOF comes as Sentinel's files are closed, a moment before it is a zombie: wait
    # for it to be gone (a clean exit removed the file already)
    deadline = time.monotonic() + SENTINEL_EXIT_WAIT_S
    while state is not None and rs.sentinel_alive(state) and time.monotonic() < deadline:
        time.sleep(0.005)
        state = rs.StateFile(path).read()
    if state is None or rs.sentinel_alive(state):
        return 0
    procs = rs.leftovers(state)
    for p in procs:
        try:
            os.kill(p["pid"], signal.SIGKILL)
        except OSError:
            pass
    deadline = time.monotonic() + KILL_WAIT_S
    left = procs
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = rs.leftovers(state)
    if procs:
        _say(
            "sentinel died without stopping the engine; guard killed its processes",
            sentinel_pid=state.sentinel_pid,
            killed=[p["pid"] for p in procs],
            still_present=[p["pid"] for p in left],
        )
    if not left:
        rs.StateFile(path).remove()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
