"""A port's listening socket (``HttpServer``: bind, the caps on open connections, in all
and per client address, serve, stop) and what it counts (``ServerEvents``). One server
per port: ``what`` ("proxy", "ops") names the port in its bind error and its log lines,
and its ``HttpLimits`` name their config keys in refusals."""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import Callable
from typing import Protocol

from sentinel.http1.connection import HttpConnection
from sentinel.http1.limits import HttpLimits
from sentinel.http1.response import Handler
from sentinel.logs import LogThrottle, get_logger
from sentinel.net import local_url

log = get_logger(__name__)


class ServerEvents(Protocol):
    """What the server counts (the proxy's metrics implement it)."""

    def connection_refused(self, reason: str) -> None:
        """A connection beyond ``max_connections`` (reason "max_connections") or
        ``max_connections_per_client`` (reason "max_connections_per_client"), closed at
        once."""

    def client_refused(self, reason: str) -> None:
        """A request refused by the connection itself (a limit, a timeout, bad framing)."""


class _Uncounted:
    def connection_refused(self, reason: str) -> None:
        pass

    def client_refused(self, reason: str) -> None:
        pass


def _counter_ids() -> Callable[[], str]:
    n = itertools.count(1)
    return lambda: f"conn-{next(n):010x}"


class ProxyBindError(RuntimeError):
    pass


def bind(host: str, port: int, backlog: int = 2048, what: str = "proxy") -> socket.socket:
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
            f"{what} cannot listen on {host}:{port} ({what}.host/{what}.port): {exc.strerror}"
        ) from None
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


class HttpServer:
    """The listening socket (bound at construction, so port 0 works and a port in use
    is reported before anything starts; or ``sock``, bound and listening already) and
    its connections."""

    def __init__(
        self,
        handler: Handler,
        host: str,
        port: int,
        limits: HttpLimits,
        events: ServerEvents | None = None,
        backlog: int = 2048,
        new_request_id: Callable[[], str] | None = None,
        *,
        what: str = "proxy",
        sock: socket.socket | None = None,
    ) -> None:
        self.handler = handler
        self.new_request_id = new_request_id or _counter_ids()
        self.host = host
        self.limits = limits
        self.events: ServerEvents = events if events is not None else _Uncounted()
        self.backlog = backlog
        self.what = what
        # lines a client can cause at will (a bug it found): at most one a minute each
        self.log_throttle = LogThrottle()
        self.sock = sock if sock is not None else bind(host, port, backlog, what)
        self.port: int = self.sock.getsockname()[1]
        self.connections: set[HttpConnection] = set()
        # open connections per client address (only with max_connections_per_client)
        self.per_client: dict[object, int] = {}
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
        log.info(f"{self.what}_listening", url=self.url, host=self.host, port=self.port)
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

    def admit_client(self, transport: asyncio.BaseTransport) -> object:
        """Count a new connection against its client address's cap: its address, or
        None when that address has ``max_connections_per_client`` open already."""
        peer = transport.get_extra_info("peername")
        client = peer[0] if isinstance(peer, tuple) and peer else str(peer)
        n = self.per_client.get(client, 0)
        if n >= self.limits.max_connections_per_client:
            return None
        self.per_client[client] = n + 1
        return client

    def release_client(self, client: object) -> None:
        n = self.per_client.get(client, 0) - 1
        if n > 0:
            self.per_client[client] = n
        else:
            self.per_client.pop(client, None)

    def request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def wait_started(self, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not self.started:
                await asyncio.sleep(0.01)
