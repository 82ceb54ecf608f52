"""Serving the proxy: uvicorn (httptools + uvloop where available) on a socket we bind,
so port 0 works and the bound port is known; uvicorn's own signal capture is
disabled because Sentinel's loop owns the signals."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Generator
from typing import Any

import uvicorn

from sentinel.logs import get_logger
from sentinel.net import local_url

log = get_logger(__name__)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _http_impl() -> str:
    try:
        import httptools  # noqa: F401
    except ImportError:
        return "h11"
    return "httptools"


class ProxyBindError(RuntimeError):
    pass


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say so (else
    # Nagle + delayed ACK add ~40 ms to every response written in two parts)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ProxyBindError(
            f"proxy cannot listen on {host}:{port} (proxy.host/proxy.port): {exc.strerror}"
        ) from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class ProxyServer:
    def __init__(self, app: Any, host: str, port: int, backlog: int = 2048) -> None:
        self.app = app
        self.host = host
        self.sock = bind(host, port)
        self.port: int = self.sock.getsockname()[1]
        self.config = uvicorn.Config(
            app,
            http=_http_impl(),
            loop="none",
            lifespan="off",
            access_log=False,
            server_header=False,
            date_header=False,
            log_config=None,
            timeout_keep_alive=75,
            backlog=backlog,
            ws="none",
            proxy_headers=False,
        )
        self.server = _Server(self.config)

    @property
    def url(self) -> str:
        return local_url(self.host, self.port)

    async def serve(self) -> None:
        log.info("proxy_listening", host=self.host, port=self.port)
        try:
            await self.server.serve(sockets=[self.sock])
        finally:
            self.sock.close()

    def request_stop(self) -> None:
        self.server.should_exit = True

    async def wait_started(self, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not self.server.started:
                await asyncio.sleep(0.01)
