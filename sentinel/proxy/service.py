"""Building the proxy from config: tiers, transports, breakers, admission, payload log,
the ASGI app and its server. ``Sentinel`` (app.py) owns one ``ProxyService``."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from contextlib import suppress

from prometheus_client import CollectorRegistry

from sentinel.config.schema import PayloadLogConfig, ProxyConfig, TierKind
from sentinel.logs import get_logger
from sentinel.payloads.log import PayloadLog
from sentinel.proxy.app import ProxyApp
from sentinel.proxy.chain import Chain, build_tier
from sentinel.proxy.metrics import ProxyMetrics
from sentinel.proxy.rawhttp import RawTransport
from sentinel.proxy.secrets import SecretError, load_api_key
from sentinel.proxy.server import ProxyBindError, ProxyServer
from sentinel.proxy.upstream import Transport
from sentinel.state import EngineStatus

log = get_logger(__name__)

TransportFactory = Callable[[str, int], Transport]
SWITCH_INTERVAL_S = 0.0005


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
    ) -> None:
        self.cfg = cfg
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
        self.app = ProxyApp(cfg, self.chain, self.metrics, self.payloads)
        self._server: ProxyServer | None = None

    def prepare(self) -> None:
        """Read the tiers' API keys and bind the traffic port. Raises ``ProxyStartError``
        naming what is wrong (a missing key source, a port in use)."""
        if self._server is not None:
            return
        for tier in self.chain.tiers:
            try:
                tier.api_key = load_api_key(tier.name, tier.cfg.api_key_env, tier.cfg.api_key_file)
            except SecretError as exc:
                raise ProxyStartError(str(exc)) from None
        try:
            self._server = ProxyServer(self.app, self.cfg.host, self.cfg.port)
        except ProxyBindError as exc:
            raise ProxyStartError(str(exc)) from None

    @property
    def server(self) -> ProxyServer:
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
        try:
            await self.server.serve()
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
