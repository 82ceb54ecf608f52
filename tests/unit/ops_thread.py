"""Run a real ops stack (probes, collectors, ops server on port 0) in a background thread."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx
from prometheus_client import CollectorRegistry

from sentinel.config import SentinelConfig
from sentinel.ops.stack import OpsStack, build_ops_stack
from sentinel.state import EngineStatus
from tests.helpers import wait_for


class Control:
    """Stands in for the supervisor: the engine's URL, restart requests recorded."""

    def __init__(self, url: str) -> None:
        self.engine_base_url = url
        self.restarts: list[tuple[str, str]] = []
        self.lines = ["INFO engine says hello", "ERROR token=abcdefgh12345 leaked in a line"]

    def request_restart(self, reason: str, detail: str = "") -> None:
        self.restarts.append((reason, detail))

    def log_tail(self) -> list[str]:
        return list(self.lines)


class OpsThread:
    def __init__(self, cfg: dict[str, Any], engine_url: str, *, run_probes: bool = True) -> None:
        base = {"ops": {"host": "127.0.0.1", "port": 0}}
        for k, v in cfg.items():
            base[k] = {**base.get(k, {}), **v}
        self.cfg = SentinelConfig.model_validate(base)
        self.status = EngineStatus()
        self.registry = CollectorRegistry(auto_describe=True)
        self.control = Control(engine_url)
        self.stack: OpsStack = build_ops_stack(
            self.cfg, self.status, self.registry, self.control, log_tail=self.control.log_tail
        )
        self.run_probes = run_probes
        self.loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self.stack.server.url

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=5, trust_env=False, **kw)

    def call(self, fn: Any) -> Any:
        """Run fn() on the stack's loop (state changes the way Sentinel makes them)."""
        assert self.loop is not None
        fut = asyncio.run_coroutine_threadsafe(_call(fn), self.loop)
        return fut.result(5)

    def start(self) -> OpsThread:
        self.stack.server.bind()
        started = threading.Event()

        def main() -> None:
            loop = asyncio.new_event_loop()
            self.loop = loop
            for coro, name in self.stack.tasks():
                if name == "probes" and not self.run_probes:
                    coro.close()
                    continue
                self._tasks.append(loop.create_task(coro, name=name))
            started.set()
            loop.run_forever()
            for t in self._tasks:
                t.cancel()
            loop.run_until_complete(asyncio.gather(*self._tasks, return_exceptions=True))
            loop.run_until_complete(self.stack.probes.aclose())
            loop.close()

        self._thread = threading.Thread(target=main, name="ops-stack", daemon=True)
        self._thread.start()
        started.wait(5)
        wait_for(lambda: _answers(self.url), 10, interval=0.02, what="ops server")
        return self

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> OpsThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _call(fn: Any) -> Any:
    return fn()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/livez", timeout=1, trust_env=False).status_code in (200, 503)
    except httpx.HTTPError:
        return False
