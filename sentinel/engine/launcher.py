"""Spawn one engine generation: a new session, stdout/stderr on pipes, no stdin."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from sentinel.engine.logcapture import EngineLine, LineSplitter

READ_CHUNK = 65536


PDEATHSIG_WRAPPER = Path(__file__).with_name("pdeathsig.py")


def _check_command(argv: list[str], env: dict[str, str], cwd: Path | None) -> None:
    """The errors exec would give, raised here (the wrapper execs in the child)."""
    exe = argv[0]
    if os.sep in exe:
        path = Path(exe) if Path(exe).is_absolute() or cwd is None else Path(cwd) / exe
        if not path.exists():
            raise FileNotFoundError(2, "No such file or directory", exe)
        if path.is_dir() or not os.access(path, os.X_OK):
            raise PermissionError(13, "Permission denied", exe)
    elif shutil.which(exe, path=env.get("PATH", os.defpath)) is None:
        raise FileNotFoundError(2, "No such file or directory", exe)
    if cwd is not None and not Path(cwd).is_dir():
        raise FileNotFoundError(2, "No such file or directory", str(cwd))


def spawn(
    argv: list[str], env: dict[str, str], cwd: Path | None, *, parent_death_kill: bool = True
) -> subprocess.Popen[bytes]:
    """Start the engine in its own session (and so its own process group).

    ``parent_death_kill``: through ``pdeathsig.py``, the kernel SIGKILLs the engine's
    API server if Sentinel dies (the pid is the API server's: the wrapper execs it).
    Raises OSError (FileNotFoundError, PermissionError) when it cannot be started.
    The caller reaps it (waitpid); never call wait()/poll() on the Popen object."""
    if parent_death_kill:
        _check_command(argv, env, cwd)
        argv = [sys.executable, "-S", str(PDEATHSIG_WRAPPER), str(os.getpid()), "--", *argv]
    return subprocess.Popen(  # noqa: S603 - the command is the operator's configuration
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=cwd,
        start_new_session=True,
        close_fds=True,
    )


async def pump(pipe: object, stream: str, on_line: Callable[[EngineLine], None]) -> None:
    """Read a pipe until EOF (every writer gone), handing each complete line on."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=READ_CHUNK * 4)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    splitter = LineSplitter(stream)
    try:
        while True:
            data = await reader.read(READ_CHUNK)
            if not data:
                break
            for line in splitter.feed(data):
                on_line(line)
    finally:
        for line in splitter.flush():
            on_line(line)
        transport.close()
