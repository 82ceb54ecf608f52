"""Run Sentinel's proxy in-process (its own event loop in a thread) for unit tests, with
fake OpenAI upstreams (tests.fake_openai) as tiers and an EngineStatus the test drives."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from sentinel.config.schema import PayloadLogConfig, ProxyConfig
from sentinel.proxy.service import ProxyService, TransportFactory
from sentinel.state import EngineStatus


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
    ) -> None:
        self.cfg = ProxyConfig(**{"host": "127.0.0.1", "port": 0, **proxy})
        self.payload_cfg = PayloadLogConfig(**{"dir": tmp / "payloads", **(payload_log or {})})
        self.status = status if status is not None else ready_status()
        self.registry = CollectorRegistry()
        self.engine_url = engine_url
        self._factory = transport_factory
        self.loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self.service: ProxyService | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> ProxyHarness:
        self._thread = threading.Thread(target=self._run, daemon=True, name="proxy-under-test")
        self._thread.start()
        if not self._started.wait(15):
            raise RuntimeError(f"proxy did not start: {self._error!r}")
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        kwargs: dict[str, Any] = {}
        if self._factory is not None:
            kwargs["transport_factory"] = self._factory

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
            task = asyncio.create_task(self.service.run())
            await self.service.server.wait_started()
            self._started.set()
            await task

        try:
            self.loop.run_until_complete(main())
        except BaseException as exc:  # noqa: BLE001 (reported to the test thread)
            self._error = exc
            self._started.set()

    @property
    def url(self) -> str:
        assert self.service is not None
        return self.service.server.url

    def call(self, fn: Any, *args: Any) -> Any:
        """Run fn(*args) on the proxy's loop (state changes the proxy reads)."""
        done = threading.Event()
        out: list[Any] = []

        def run() -> None:
            out.append(fn(*args))
            done.set()

        self.loop.call_soon_threadsafe(run)
        done.wait(5)
        return out[0] if out else None

    def metrics_text(self) -> str:
        return generate_latest(self.registry).decode()

    def metric(self, name: str, **labels: str) -> float | None:
        v = self.registry.get_sample_value(name, labels)
        return v

    def stop(self) -> None:
        if self.service is not None:
            self.loop.call_soon_threadsafe(self.service.server.request_stop)
        if self._thread is not None:
            self._thread.join(15)

    def __enter__(self) -> ProxyHarness:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
