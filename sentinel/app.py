"""The one place that wires Sentinel together.

engine process -> supervisor, probes, collectors -> EngineStatus -> ops endpoints, metrics
request -> proxy -> degradation chain -> upstreams

Signal handlers only queue work for the supervisor's loop (as uvicorn's
supervisors do); nothing is acted on inside a handler.
"""

from __future__ import annotations

import asyncio
import signal
from contextlib import suppress

from prometheus_client import CollectorRegistry

from sentinel.config import SentinelConfig
from sentinel.logs import configure_logging, get_logger
from sentinel.state import EngineStatus

log = get_logger("sentinel.app")


class Sentinel:
    """Owns every component for one `sentinel run`."""

    def __init__(self, cfg: SentinelConfig) -> None:
        from sentinel.engine.supervisor import Supervisor

        self.cfg = cfg
        self.status = EngineStatus()
        self.registry = CollectorRegistry(auto_describe=True)
        self.supervisor = Supervisor(cfg.engine, cfg.supervisor, self.status)
        self._tasks: list[asyncio.Task[object]] = []
        # --- probes, ops server and metrics (issue 3) ---
        # --- GPU telemetry (issue 4) ---
        # --- proxy and degradation chain (issue 5) ---

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.supervisor.request_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self.supervisor.request_restart, "sighup")
        loop.add_signal_handler(signal.SIGCHLD, self.supervisor.notify_child_exit)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._install_signals(loop)
        # --- start background components here: append their tasks to self._tasks ---
        try:
            return await self.supervisor.run()
        finally:
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with suppress(asyncio.CancelledError):
                    await task


def run_sentinel(cfg: SentinelConfig) -> int:
    configure_logging(cfg.logging)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(Sentinel(cfg).run())
    return uvloop.run(Sentinel(cfg).run())
