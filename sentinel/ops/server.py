"""The ops port's server: the ops app (Starlette, ASGI) served by ``sentinel.http1``, our
own HTTP/1.1 server, on Sentinel's own event loop, under ``ops.limits`` (the traffic
port's limits: header size and time, body size, idle keep-alive, open connections, plus
a cap per client address), so that no client can starve the probes.

Binding first (``bind()``) gives an immediate, clear error when the port is taken and
the real port when 0 was asked for; a host name is resolved with getaddrinfo.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from sentinel.config.schema import OpsLimitsConfig
from sentinel.http1.asgi import AsgiApp, AsgiHandler
from sentinel.http1.limits import HttpLimits
from sentinel.http1.server import HttpServer
from sentinel.logs import get_logger
from sentinel.net import local_url

log = get_logger(__name__)

STOP_GRACE_S = 1.0  # requests in flight at a stop get this long to end


class OpsBindError(Exception):
    """The ops server cannot listen where it was told to."""


def ops_limits(cfg: OpsLimitsConfig, what: str = "ops") -> HttpLimits:
    return HttpLimits(
        max_request_line_bytes=cfg.max_request_line_bytes,
        max_header_bytes=cfg.max_header_bytes,
        max_headers=cfg.max_headers,
        max_body_bytes=cfg.max_body_bytes,
        header_timeout_s=cfg.header_timeout_s,
        body_timeout_s=cfg.body_timeout_s,
        keepalive_timeout_s=cfg.keepalive_timeout_s,
        send_timeout_s=cfg.send_timeout_s,
        max_connections=cfg.max_connections,
        max_connections_per_client=cfg.max_connections_per_client,
        key_prefix=f"{what}.limits",
        body_key=f"{what}.limits.max_body_bytes",
    )


class OpsServerMetrics:
    """What the ops port refuses (``http1.server.ServerEvents``), in the ops registry."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.connections_refused = Counter(
            "sentinel_ops_connections_refused",
            "Connections to the ops port closed at once: over ops.limits.max_connections "
            "(reason max_connections) or ops.limits.max_connections_per_client from one "
            "client address (reason max_connections_per_client).",
            ["reason"],
            registry=registry,
        )
        self.requests_refused = Counter(
            "sentinel_ops_requests_refused",
            "Requests (or idle connections) the ops port refused itself: a limit of "
            "ops.limits (header_too_large, too_many_headers, uri_too_long, body_too_large), "
            "a timeout (header_timeout, body_timeout, idle_timeout, send_timeout) or bad "
            "framing (bad_request).",
            ["reason"],
            registry=registry,
        )
        for reason in ("max_connections", "max_connections_per_client"):
            self.connections_refused.labels(reason)
        for reason in ("header_too_large", "header_timeout"):
            self.requests_refused.labels(reason)

    def connection_refused(self, reason: str) -> None:
        self.connections_refused.labels(reason).inc()

    def client_refused(self, reason: str) -> None:
        self.requests_refused.labels(reason).inc()


class OpsServer:
    def __init__(
        self,
        app: Any,
        host: str,
        port: int,
        *,
        what: str = "ops",
        limits: HttpLimits | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.host = host
        self.requested_port = port
        self.what = what
        self.limits = limits if limits is not None else ops_limits(OpsLimitsConfig(), what)
        self.events = OpsServerMetrics(registry)
        self._app: AsgiApp = app
        self._sock: socket.socket | None = None
        self._server: HttpServer | None = None
        self._stopping = False

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
        # proto IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say so
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
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
        sock.listen(2048)  # connections wait in the backlog until served
        sock.setblocking(False)
        self._sock = sock
        return self.port

    async def serve(self) -> None:
        if self._sock is None:
            self.bind()
        assert self._sock is not None
        if self._stopping:
            self._sock.close()
            return
        self._server = HttpServer(
            AsgiHandler(self._app, self.what),
            self.host,
            self.port,
            self.limits,
            self.events,
            what=self.what,
            sock=self._sock,
        )
        await self._server.serve(grace_s=STOP_GRACE_S)

    def request_stop(self) -> None:
        self._stopping = True
        if self._server is not None:
            self._server.request_stop()


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
