"""Run Sentinel's proxy in-process (its own event loop in a thread) for unit tests, with
fake OpenAI upstreams (tests.fake_openai) as tiers and an EngineStatus the test drives."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from sentinel.config.schema import PayloadLogConfig, ProxyConfig
from sentinel.proxy.secrets import Secret
from sentinel.proxy.service import ProxyService, TransportFactory
from sentinel.state import EngineStatus
from tests.loop_thread import LoopThread


def ready_status() -> EngineStatus:
    status = EngineStatus()
    status.new_generation()
    status.mark_loaded()
    status.set_readiness(True, {})
    return status


class ProxyHarness:
    def __init__(
        self,
        proxy: dict[str, Any],
        tmp: Path,
        status: EngineStatus | None = None,
        engine_url: str = "http://127.0.0.1:9",
        payload_log: dict[str, Any] | None = None,
        transport_factory: TransportFactory | None = None,
        engine_api_key: str | None = None,
    ) -> None:
        self.cfg = ProxyConfig(**{"host": "127.0.0.1", "port": 0, **proxy})
        self.payload_cfg = PayloadLogConfig(**{"dir": tmp / "payloads", **(payload_log or {})})
        self.status = status if status is not None else ready_status()
        self.registry = CollectorRegistry()
        self.engine_url = engine_url
        self._factory = transport_factory
        self._engine_key = engine_api_key
        self._thread = LoopThread("proxy-under-test")
        self.service: ProxyService | None = None
        self._serving: asyncio.Task[None] | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._thread.loop

    def start(self) -> ProxyHarness:
        kwargs: dict[str, Any] = {}
        if self._factory is not None:
            kwargs["transport_factory"] = self._factory
        if self._engine_key is not None:
            kwargs["engine_api_key"] = Secret(self._engine_key)

        async def main() -> None:
            self.service = ProxyService(
                self.cfg,
                self.payload_cfg,
                self.status,
                self.registry,
                engine_base_url=lambda: self.engine_url,
                **kwargs,
            )
            self.service.prepare()
            self._serving = serving = asyncio.create_task(self.service.run())
            started = asyncio.ensure_future(self.service.server.wait_started())
            await asyncio.wait({started, serving}, return_when=asyncio.FIRST_COMPLETED)
            if not started.done():
                started.cancel()
                serving.result()  # what stopped the proxy
                raise RuntimeError("the proxy stopped before it listened")

        self._thread.start(main, timeout=15)
        return self

    @property
    def url(self) -> str:
        assert self.service is not None
        return self.service.server.url

    def call(self, fn: Any, *args: Any) -> Any:
        """Run fn(*args) on the proxy's loop (state changes the proxy reads)."""
        return self._thread.call(fn, *args)

    def metrics_text(self) -> str:
        return generate_latest(self.registry).decode()

    def metric(self, name: str, **labels: str) -> float | None:
        v = self.registry.get_sample_value(name, labels)
        return v

    def stop(self) -> None:
        if self.service is not None:
            self.loop.call_soon_threadsafe(self.service.server.request_stop)

        async def finish() -> None:
            if self._serving is not None:
                await asyncio.gather(self._serving, return_exceptions=True)

        self._thread.stop(finish, timeout=15)

    def __enter__(self) -> ProxyHarness:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
