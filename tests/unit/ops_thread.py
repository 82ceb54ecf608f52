"""Run a real ops stack (probes, collectors, ops server on port 0) in a background thread."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from sentinel.config import SentinelConfig
from sentinel.ops.metrics import SentinelRegistry
from sentinel.ops.stack import OpsStack, build_ops_stack
from sentinel.state import EngineStatus
from tests.helpers import wait_for
from tests.loop_thread import LoopThread


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
        self.registry = SentinelRegistry()
        self.control = Control(engine_url)
        self.stack: OpsStack = build_ops_stack(
            self.cfg, self.status, self.registry, self.control, log_tail=self.control.log_tail
        )
        self.run_probes = run_probes
        self._tasks: list[asyncio.Task[Any]] = []
        self._thread = LoopThread("ops-stack")

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._thread.loop

    @property
    def url(self) -> str:
        return self.stack.server.url

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=5, trust_env=False, **kw)

    def call(self, fn: Any) -> Any:
        """Run fn() on the stack's loop (state changes the way Sentinel makes them)."""
        return self._thread.call(fn)

    def start(self) -> OpsThread:
        self.stack.server.bind()

        async def start_tasks() -> None:
            loop = asyncio.get_running_loop()
            for coro, name in self.stack.tasks():
                if name == "probes" and not self.run_probes:
                    coro.close()
                    continue
                self._tasks.append(loop.create_task(coro, name=name))

        self._thread.start(start_tasks, timeout=5)
        wait_for(lambda: _answers(self.url), 10, interval=0.02, what="ops server")
        return self

    def stop(self) -> None:
        async def end_tasks() -> None:
            for t in self._tasks:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.stack.probes.aclose()

        self._thread.stop(end_tasks)

    def __enter__(self) -> OpsThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/livez", timeout=1, trust_env=False).status_code in (200, 503)
    except httpx.HTTPError:
        return False
