"""Spawn one engine generation: a new session, stdout/stderr on pipes, no stdin."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable
from pathlib import Path

from sentinel.engine.logcapture import EngineLine, LineSplitter

READ_CHUNK = 65536


def spawn(argv: list[str], env: dict[str, str], cwd: Path | None) -> subprocess.Popen[bytes]:
    """Start the engine in its own session (and so its own process group).

    Raises OSError (FileNotFoundError, PermissionError) when it cannot be started.
    The caller reaps it (waitpid); never call wait()/poll() on the Popen object."""
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
