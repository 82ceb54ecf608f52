"""The traffic port's listening socket (``HttpServer``: bind, the cap on open
connections, serve, stop) and what it counts (``ServerEvents``)."""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import Callable
from typing import Protocol

from sentinel.http1.connection import HttpConnection
from sentinel.http1.limits import HttpLimits
from sentinel.http1.response import Handler
from sentinel.logs import get_logger
from sentinel.net import local_url

log = get_logger(__name__)


class ServerEvents(Protocol):
    """What the server counts (the proxy's metrics implement it)."""

    def connection_refused(self) -> None:
        """A connection beyond ``max_connections``, closed at once."""

    def client_refused(self, reason: str) -> None:
        """A request refused by the connection itself (a limit, a timeout, bad framing)."""


class _Uncounted:
    def connection_refused(self) -> None:
        pass

    def client_refused(self, reason: str) -> None:
        pass


def _counter_ids() -> Callable[[], str]:
    n = itertools.count(1)
    return lambda: f"conn-{next(n):010x}"


class ProxyBindError(RuntimeError):
    pass


def bind(host: str, port: int, backlog: int = 2048) -> socket.socket:
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
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


class HttpServer:
    """The listening socket (bound at construction, so port 0 works and a port in use
    is reported before anything starts) and its connections."""

    def __init__(
        self,
        handler: Handler,
        host: str,
        port: int,
        limits: HttpLimits,
        events: ServerEvents | None = None,
        backlog: int = 2048,
        new_request_id: Callable[[], str] | None = None,
    ) -> None:
        self.handler = handler
        self.new_request_id = new_request_id or _counter_ids()
        self.host = host
        self.limits = limits
        self.events: ServerEvents = events if events is not None else _Uncounted()
        self.backlog = backlog
        self.sock = bind(host, port, backlog)
        self.port: int = self.sock.getsockname()[1]
        self.connections: set[HttpConnection] = set()
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by serve
        self.started = False
        self._stop: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return local_url(self.host, self.port)

    async def serve(self, grace_s: float = 5.0) -> None:
        """Serve until ``request_stop`` (then requests in flight get ``grace_s`` to end)
        or cancellation (connections are aborted at once)."""
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await self.loop.create_server(
            lambda: HttpConnection(self), sock=self.sock, backlog=self.backlog
        )
        log.info("proxy_listening", host=self.host, port=self.port)
        self.started = True
        try:
            await self._stop.wait()
            server.close()
            for conn in list(self.connections):
                conn.closing = True
                if conn._active is None:
                    conn.close()
            async with asyncio.timeout(grace_s):
                while self.connections:
                    await asyncio.sleep(0.05)
        except TimeoutError:
            pass
        finally:
            server.close()
            for conn in list(self.connections):
                if conn.transport is not None:
                    conn.transport.abort()
            self.sock.close()

    def request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def wait_started(self, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not self.started:
                await asyncio.sleep(0.01)
