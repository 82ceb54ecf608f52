"""Graceful drain, resume and restart: one coordinator between the proxy, the probes'
view (``EngineStatus.drain`` -> /readyz) and the supervisor.

Shutdown (SIGTERM, a preemption notice):
  /readyz 503 at once -> new requests 503 + Retry-After at the proxy's gate -> requests
  in flight finish, up to lifecycle.drain_timeout_s -> the supervisor stops the engine
  (TERM to the API server first, then the rest, then KILL) -> Sentinel exits (SIGTERM)
  or stays up with the engine stopped (preemption). A second SIGTERM skips what is left:
  the wait for requests and the engine's grace.
By hand (``sentinel drain`` / ``resume``): the same gate, the engine kept running; new
requests go to the next tier where there is one (lifecycle.drain_fallback).
Restart (``sentinel restart``): drain by hand, replace the engine, wait until the new
generation has served a real inference, resume.

Signal handlers and HTTP handlers only queue; ``run()`` acts, one operation at a time
(a SIGTERM cuts short whatever else is going on).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from sentinel.config.schema import LifecycleConfig, ProxyConfig, TierKind
from sentinel.logs import get_logger
from sentinel.state import DrainInfo, EngineStatus

log = get_logger("sentinel.lifecycle")

OUTCOMES = ("completed", "timeout", "skipped")
READY_POLL_S = 0.2


class Drainable(Protocol):
    """What the drain needs of the proxy (``ProxyService``)."""

    def begin_drain(self, retry_after_s: float, fallback: bool) -> None: ...
    def end_drain(self) -> None: ...
    @property
    def in_flight(self) -> int: ...
    async def wait_idle(self, timeout_s: float) -> bool: ...


class EngineOps(Protocol):
    """What the drain needs of the supervisor."""

    def request_stop(
        self, sig: int = ..., exit_after: bool = ..., grace_s: float | None = ...
    ) -> None: ...
    def request_restart(self, reason: str, detail: str = "") -> None: ...


class LifecycleError(Exception):
    """An operation that cannot be done now (the message says why): HTTP 409."""


class DrainMetrics:
    def __init__(self, registry: CollectorRegistry | None, status: EngineStatus) -> None:
        self.active = Gauge(
            "sentinel_drain_active", "1 while a drain is in progress.", registry=registry
        )
        self.seconds = Gauge(
            "sentinel_drain_seconds",
            "Duration of the last drain's wait for requests in flight.",
            registry=registry,
        )
        self.total = Counter(
            "sentinel_drains",
            "Drains by outcome: completed (in-flight requests finished), timeout "
            "(lifecycle.drain_timeout_s ran out), skipped (a second SIGTERM).",
            ["outcome"],
            registry=registry,
        )
        for outcome in OUTCOMES:
            self.total.labels(outcome)
        self.unkillable = Gauge(
            "sentinel_engine_unkillable",
            "Engine processes still present after SIGKILL (uninterruptible sleep).",
            registry=registry,
        )
        self.unkillable.set_function(lambda: len(status.unkillable))


class DrainController:
    def __init__(
        self,
        cfg: LifecycleConfig,
        proxy_cfg: ProxyConfig | None,
        status: EngineStatus,
        engine: EngineOps,
        proxy: Drainable | None,
        registry: CollectorRegistry | None = None,
        startup_timeout_s: float = 900.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.status = status
        self.engine = engine
        self.proxy = proxy
        self.metrics = DrainMetrics(registry, status)
        self.startup_timeout_s = startup_timeout_s
        self._clock = clock
        self._has_next_tier = proxy_cfg is not None and any(
            t.kind != TierKind.local for t in proxy_cfg.tiers[1:]
        )
        self._queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._terms = 0
        self._skip = asyncio.Event()
        self._shutting_down = False
        self._op: asyncio.Task[Any] | None = None
        self.last: dict[str, Any] | None = None  # the last drain: outcome, seconds, reason

    # ---- called from signal handlers (only queue) ----------------------------------
    def on_sigterm(self, sig: int = signal.SIGTERM) -> None:
        self._terms += 1
        self._put(("shutdown", int(sig), f"{signal.Signals(sig).name.lower()}", True))

    def on_preemption(self, detail: str) -> None:
        self._put(("shutdown", int(signal.SIGTERM), f"preemption: {detail}", False))

    def _put(self, item: tuple[Any, ...]) -> None:
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self._queue.put_nowait, item)
        else:
            self._queue.put_nowait(item)

    # ---- called from admin handlers (on the loop) ------------------------------------
    async def drain(self, wait: bool) -> dict[str, Any]:
        """Drain by hand; with ``wait``, return once in-flight requests are done."""
        self._refuse_while_shutting_down("drain")
        if self._op is not None and not self._op.done():
            raise LifecycleError("a restart is in progress; wait for it to finish")
        if self.status.drain is None:
            self._begin("admin", by_hand=True)
        if wait:
            await self._wait_requests(self._clock())
        return self.describe()

    async def resume(self) -> dict[str, Any]:
        self._refuse_while_shutting_down("resume")
        drain = self.status.drain
        if drain is None:
            raise LifecycleError("not draining: nothing to resume")
        if not drain.by_hand:
            raise LifecycleError(f"this drain ({drain.reason}) was not asked for by hand")
        if self._op is not None and not self._op.done():
            raise LifecycleError("a restart is in progress; it resumes by itself when ready")
        self._end()
        return self.describe()

    async def restart(self, wait: bool) -> dict[str, Any]:
        self._refuse_while_shutting_down("restart")
        if self._op is not None and not self._op.done():
            raise LifecycleError("a restart is already in progress")
        self._op = asyncio.get_running_loop().create_task(self._restart(), name="restart")
        self._op.add_done_callback(_report_restart)
        if wait:
            return await asyncio.shield(self._op)
        return {**self.describe(), "restart": "started"}

    def describe(self) -> dict[str, Any]:
        drain = self.status.drain
        return {
            "draining": drain is not None,
            "drain": None if drain is None else {**drain.__dict__},
            "in_flight": self.proxy.in_flight if self.proxy is not None else None,
            "state": self.status.snapshot()["state"],
            "generation": self.status.generation,
            "last_drain": self.last,
        }

    def _refuse_while_shutting_down(self, what: str) -> None:
        if self._shutting_down:
            raise LifecycleError(f"Sentinel is shutting down; `{what}` is not possible now")

    # ---- the loop ------------------------------------------------------------------------
    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        while True:
            cmd = await self._queue.get()
            if cmd[0] == "shutdown":
                _, sig, reason, exit_after = cmd
                if self._shutting_down:
                    if exit_after:  # a second SIGTERM: skip the rest
                        log.warning("second signal: skipping the rest of the drain", signal=sig)
                        self._skip.set()
                        self.engine.request_stop(sig)
                    continue
                self._shutting_down = True
                if self._op is not None and not self._op.done():
                    self._op.cancel()
                    with contextlib.suppress(asyncio.CancelledError, LifecycleError):
                        await self._op
                asyncio.get_running_loop().create_task(
                    self._shutdown(sig, reason, exit_after), name="drain-shutdown"
                )

    async def _shutdown(self, sig: int, reason: str, exit_after: bool) -> None:
        t0 = self._clock()
        if self.status.drain is not None:
            self._end(quiet=True)  # a drain by hand becomes the shutdown's drain
        self._begin(reason, by_hand=False, fallback=False)
        outcome = await self._wait_requests(t0)
        # nothing left in flight: the engine's own teardown has nothing to save (vLLM's
        # takes ~10 s on the CPU, its Worker ignoring TERM): a short grace, then KILL
        # (without the proxy Sentinel cannot see requests: vLLM gets its full grace)
        short = outcome == "completed" and self.proxy is not None
        grace = self.cfg.engine_grace_after_drain_s if short else None
        self.engine.request_stop(sig, exit_after, grace)

    async def _restart(self) -> dict[str, Any]:
        t0 = self._clock()
        if self.status.drain is None:
            self._begin("restart", by_hand=True)
        try:
            await self._wait_requests(t0)
            old = self.status.generation
            self.engine.request_restart("operator", "sentinel restart")
            deadline = time.monotonic() + self.startup_timeout_s
            while not (self.status.generation > old and self.status.loaded):
                if time.monotonic() >= deadline:
                    raise LifecycleError(
                        f"the new engine did not load within {self.startup_timeout_s:g}s "
                        "(supervisor.startup_timeout_s); still draining: `sentinel resume` "
                        "takes traffic again"
                    )
                await asyncio.sleep(READY_POLL_S)
        except asyncio.CancelledError:
            raise
        self._end()
        log.info(
            "restart done", generation=self.status.generation, seconds=round(self._clock() - t0, 2)
        )
        return {**self.describe(), "restart": "done", "seconds": round(self._clock() - t0, 3)}

    # ---- pieces ----------------------------------------------------------------------------
    def _begin(self, reason: str, by_hand: bool, fallback: bool | None = None) -> None:
        if fallback is None:
            fallback = self.cfg.drain_fallback and self._has_next_tier
        self.status.set_drain(DrainInfo(reason, self._clock(), fallback, by_hand))
        if self.proxy is not None:
            self.proxy.begin_drain(self.cfg.drain_retry_after_s, fallback)
        self.metrics.active.set(1)
        log.info(
            "draining",
            reason=reason,
            by_hand=by_hand,
            new_requests="next tier" if fallback else "503 + Retry-After",
            in_flight=self.proxy.in_flight if self.proxy is not None else None,
            timeout_s=self.cfg.drain_timeout_s,
        )

    def _end(self, quiet: bool = False) -> None:
        if self.proxy is not None:
            self.proxy.end_drain()
        self.status.set_drain(None)
        self.metrics.active.set(0)
        if not quiet:
            log.info("drain ended: taking traffic again")

    async def _wait_requests(self, t0: float) -> str:
        """Wait for requests in flight (or the timeout, or a second SIGTERM)."""
        outcome = "completed"
        if self.proxy is not None:
            idle = asyncio.ensure_future(self.proxy.wait_idle(self.cfg.drain_timeout_s))
            skip = asyncio.ensure_future(self._skip.wait())
            try:
                await asyncio.wait({idle, skip}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for fut in (idle, skip):
                    fut.cancel()
            if skip.done() and not skip.cancelled() and not idle.done():
                outcome = "skipped"
            elif idle.done() and not idle.cancelled() and idle.result() is False:
                outcome = "timeout"
        seconds = max(0.0, self._clock() - t0)
        self.metrics.seconds.set(seconds)
        self.metrics.total.labels(outcome).inc()
        left = self.proxy.in_flight if self.proxy is not None else 0
        self.last = {"outcome": outcome, "seconds": round(seconds, 3), "left_in_flight": left}
        (log.info if outcome == "completed" else log.warning)(
            "drain wait over", outcome=outcome, seconds=round(seconds, 3), left_in_flight=left
        )
        return outcome


def _report_restart(task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        log.warning("restart cancelled (Sentinel is shutting down)")
    elif task.exception() is not None:
        log.error("restart did not complete", error=str(task.exception()))
