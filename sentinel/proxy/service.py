"""Building the proxy from config: tiers, transports, breakers, admission, payload log,
the request handler and its HTTP server. ``Sentinel`` (app.py) owns one
``ProxyService``; the lifecycle drains it (``begin_drain`` ... ``wait_idle``)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from contextlib import suppress

from prometheus_client import CollectorRegistry

from sentinel.config.schema import PayloadLogConfig, ProxyConfig, TierKind
from sentinel.http1.limits import HttpLimits
from sentinel.http1.server import HttpServer, ProxyBindError
from sentinel.logs import get_logger
from sentinel.payloads.log import PayloadLog
from sentinel.proxy.auth import Authenticator
from sentinel.proxy.breaker import BreakerState
from sentinel.proxy.chain import Chain
from sentinel.proxy.handler import ProxyHandler
from sentinel.proxy.metrics import ProxyMetrics
from sentinel.proxy.rawhttp import RawTransport
from sentinel.proxy.request import new_request_id
from sentinel.proxy.secrets import Secret, SecretError, load_api_key
from sentinel.proxy.tier import Tier, build_tier
from sentinel.proxy.upstream import Transport
from sentinel.state import EngineStatus

log = get_logger(__name__)

TransportFactory = Callable[[str, int], Transport]
SWITCH_INTERVAL_S = 0.0005
IDLE_POLL_S = 0.01  # how often a drain with fallback looks at the local tier
IDLE_POLL_S = 0.01


def local_only(on_local_stream_idle: Callable[[float], None]) -> Callable[[Tier, float], None]:
    """The handler's stream-idle callback that passes on the local tier's only: another
    tier's slow stream (an external API) says nothing about the engine."""

    def on_idle(tier: Tier, idle_s: float) -> None:
        if tier.local:
            on_local_stream_idle(idle_s)

    return on_idle


class ProxyStartError(RuntimeError):
    """The proxy cannot start: the message names the config key and the problem."""


def _default_transport(_tier: str, limit: int) -> Transport:
    return RawTransport(limit=limit)


class ProxyService:
    def __init__(
        self,
        cfg: ProxyConfig,
        payload_cfg: PayloadLogConfig,
        status: EngineStatus,
        registry: CollectorRegistry,
        engine_base_url: Callable[[], str],
        transport_factory: TransportFactory = _default_transport,
        engine_api_key: Secret | None = None,
        on_local_stream_idle: Callable[[float], None] | None = None,
    ) -> None:
        """``on_local_stream_idle(idle_s)``: a stream from the local engine sent nothing
        for ``proxy.stream_idle_timeout_s`` mid-stream (issue 15: stall detection)."""
        self.cfg = cfg
        # engine.api_key_env: the local tier sends the engine's key instead of the client's
        self._engine_key = engine_api_key
        self.metrics = ProxyMetrics(registry, [t.name for t in cfg.tiers])
        tiers = []
        for tcfg in cfg.tiers:
            if tcfg.kind == TierKind.local:
                base_url = engine_base_url
            else:
                url = str(tcfg.base_url)

                def base_url(u: str = url) -> str:
                    return u

            tiers.append(
                build_tier(
                    tcfg,
                    base_url,
                    transport_factory(tcfg.name, tcfg.max_concurrency),
                    cfg.breaker,
                    cfg.admission,
                    self.metrics,
                    None,
                )
            )
        self.chain = Chain(tiers, status, cfg.admission, self.metrics)
        self.payloads = PayloadLog(payload_cfg, registry) if payload_cfg.enabled else None
        self.auth = Authenticator(cfg.auth, cfg.tiers, registry)
        on_idle = local_only(on_local_stream_idle) if on_local_stream_idle is not None else None
        self.handler = ProxyHandler(
            cfg,
            self.chain,
            self.metrics,
            self.payloads,
            authenticate=self.auth.check,
            on_stream_idle=on_idle,
        )
        lim = cfg.limits
        self.limits = HttpLimits(
            max_request_line_bytes=lim.max_request_line_bytes,
            max_header_bytes=lim.max_header_bytes,
            max_headers=lim.max_headers,
            max_body_bytes=cfg.max_body_bytes,
            header_timeout_s=lim.header_timeout_s,
            body_timeout_s=lim.body_timeout_s,
            keepalive_timeout_s=lim.keepalive_timeout_s,
            send_timeout_s=lim.send_timeout_s,
            max_connections=lim.max_connections,
        )
        self._server: HttpServer | None = None
        # why the proxy stopped serving (its task crashed), for readiness
        self.failed: str | None = None

    # ---- drain (the lifecycle's interface) ----------------------------------------------
    def begin_drain(self, retry_after_s: float, fallback: bool) -> None:
        """New requests get 503 + Retry-After naming the drain (``fallback``: they skip
        the local tier for the next ones instead); requests in flight finish."""
        self.handler.begin_drain(retry_after_s, fallback)

    def end_drain(self) -> None:
        self.handler.end_drain()

    @property
    def in_flight(self) -> int:
        """The requests a drain waits for: with fallback, those on the local tier (queued or
        running; new ones go to the next tiers); else every request accepted and not yet
        finished, all tiers."""
        if self.handler.draining and self.handler.drain_fallback:
            n = 0
            for tier in self.chain.tiers:
                if tier.local:
                    n += tier.in_use() + (tier.admission.queued if tier.admission else 0)
            return n
        return self.handler.in_flight

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until ``in_flight`` is 0 (True) or ``timeout_s`` passes (False)."""
        if not (self.handler.draining and self.handler.drain_fallback):
            return await self.handler.wait_idle(timeout_s)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.in_flight > 0:
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(IDLE_POLL_S)
        return True

    # ---- readiness ---------------------------------------------------------------------
    def readiness(self) -> tuple[tuple[bool, str], str]:
        """The proxy's word for /readyz, and the mode (``proxy.readiness``): in
        ``any_tier`` whether some tier can serve; in either mode, not ready once the
        proxy has stopped serving (its task crashed)."""
        mode = self.cfg.readiness
        if self.failed is not None:
            return (False, f"proxy stopped: {self.failed}"), mode
        if mode == "any_tier":
            return self.can_serve(), mode
        return (True, "proxy serving"), mode

    def can_serve(self) -> tuple[bool, str]:
        """Whether any tier can take traffic now (``proxy.readiness: any_tier``): the
        local engine ready, or another tier whose breaker is not open."""
        if self.failed is not None:
            return False, f"proxy stopped: {self.failed}"
        usable = []
        for tier in self.chain.tiers:
            if tier.local:
                if self.chain.status.ready and not self.handler.draining:
                    usable.append(tier.name)
            elif tier.breaker.state is not BreakerState.open:
                usable.append(tier.name)
        if usable:
            return True, "tiers that can serve: " + ", ".join(usable)
        return False, "no tier can serve (local engine not ready, other breakers open)"

    def prepare(self) -> None:
        """Read the tiers' API keys and bind the traffic port. Raises ``ProxyStartError``
        naming what is wrong (a missing key source, a port in use)."""
        if self._server is not None:
            return
        for tier in self.chain.tiers:
            try:
                tier.api_key = load_api_key(tier.name, tier.cfg.api_key_env, tier.cfg.api_key_file)
                if tier.local and tier.api_key is None:
                    tier.api_key = self._engine_key
            except SecretError as exc:
                raise ProxyStartError(str(exc)) from None
        try:
            self.auth.load()
        except SecretError as exc:
            raise ProxyStartError(str(exc)) from None
        try:
            self._server = HttpServer(
                self.handler,
                self.cfg.host,
                self.cfg.port,
                self.limits,
                self.metrics,
                new_request_id=new_request_id,
            )
        except ProxyBindError as exc:
            raise ProxyStartError(str(exc)) from None

    @property
    def server(self) -> HttpServer:
        if self._server is None:
            raise RuntimeError("ProxyService.prepare() has not run")
        return self._server

    @property
    def port(self) -> int:
        return self.server.port

    async def run(self) -> None:
        self.prepare()
        # Threads beside the loop (the payload writer redacting sampled and failed
        # requests' bodies, the GPU poller) hold the GIL between their releases, and the
        # event loop waits up to the switch interval (5 ms by default) to get it back:
        # a 5 ms tail on proxied requests. 0.5 ms bounds that wait.
        if sys.getswitchinterval() > SWITCH_INTERVAL_S:
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        if self.payloads is not None:
            self.payloads.start()
        log.info(
            "proxy_chain",
            tiers=[t.name for t in self.chain.tiers],
            port=self.port,
        )
        server = self.server
        self.metrics.open_connections.set_function(lambda: len(server.connections))
        try:
            await server.serve()
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.request_stop()
        for tier in self.chain.tiers:
            with suppress(OSError):
                await tier.transport.aclose()
        if self.payloads is not None:
            await asyncio.to_thread(self.payloads.stop)
