"""Serve an ASGI app with uvicorn on Sentinel's own event loop, on a socket we bind.

Binding first (``bind()``) gives an immediate, clear error when the port is
taken and the real port when 0 was asked for. uvicorn's own signal handling is
switched off: Sentinel's signal handlers stay in charge of shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import Generator
from typing import Any

import uvicorn

from sentinel.logs import get_logger
from sentinel.net import local_url

log = get_logger(__name__)


class OpsBindError(Exception):
    """The ops server cannot listen where it was told to."""


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:  # uvicorn >= 0.29
        yield

    def install_signal_handlers(self) -> None:  # older uvicorn
        return None


class OpsServer:
    def __init__(self, app: Any, host: str, port: int, *, what: str = "ops") -> None:
        self.host = host
        self.requested_port = port
        self.what = what
        self._app = app
        self._sock: socket.socket | None = None
        self._server: _Server | None = None

    @property
    def port(self) -> int:
        if self._sock is None:
            raise RuntimeError("OpsServer.bind() was not called")
        return int(self._sock.getsockname()[1])

    @property
    def url(self) -> str:
        return local_url(self.host, self.port)

    def bind(self) -> int:
        try:
            infos = socket.getaddrinfo(
                self.host or None,
                self.requested_port,
                type=socket.SOCK_STREAM,
                flags=socket.AI_PASSIVE,
            )
        except socket.gaierror as exc:
            raise OpsBindError(f"{self.what}.host {self.host!r} does not resolve: {exc}") from None
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                why = "is already in use by another process"
            elif exc.errno == errno.EACCES:
                why = "needs privileges to bind"
            else:
                why = f"cannot be bound ({exc.strerror})"
            raise OpsBindError(
                f"{self.what}.port {self.requested_port} on {self.what}.host {self.host!r} {why}"
            ) from None
        sock.listen(2048)  # connections wait in the backlog until uvicorn serves them
        sock.setblocking(False)
        self._sock = sock
        return self.port

    async def serve(self) -> None:
        if self._sock is None:
            self.bind()
        assert self._sock is not None
        config = uvicorn.Config(
            self._app,
            log_config=None,
            access_log=False,
            lifespan="off",
            server_header=False,
            timeout_graceful_shutdown=1,
        )
        self._server = _Server(config)
        try:
            await self._server.serve(sockets=[self._sock])
        finally:
            self._sock.close()

    def request_stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True


def report_task_crash(task: asyncio.Task[Any]) -> None:
    """Done-callback for background tasks: a component that dies says so in the log."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error(
            "background task crashed",
            task=task.get_name(),
            error=f"{type(exc).__name__}: {exc}",
            exc_info=exc,
        )
