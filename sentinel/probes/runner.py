"""The probe tasks: inference probe, engine metrics scrape, readiness and actions.

Three loops on Sentinel's event loop:
- inference probe every ``probes.interval_s`` while the engine is starting or
  running; its first success of a generation marks the engine loaded;
- engine /metrics scrape every ``probes.metrics_interval_s`` while running:
  engine values into ``EngineStatus``, stall detection, the passthrough cache;
- a watch loop that recomputes readiness and applies ``on_stall`` /
  ``on_not_ready`` (report only, or ask the supervisor for a restart with the reason).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Protocol

import httpx

from sentinel.config.schema import EngineConfig, ProbeAction, ProbesConfig
from sentinel.logs import LogThrottle, get_logger
from sentinel.probes.inference import (
    PROBE_NAME,
    InferenceProbe,
    configured_model_name,
    engine_api_key,
)
from sentinel.probes.progress import (
    GENERATION_TOKENS,
    PROMPT_TOKENS,
    RUNNING,
    EngineMetricsScraper,
    StallDetector,
)
from sentinel.probes.readiness import Checks, evaluate_readiness, pod_readiness
from sentinel.state import EngineStatus, Lifecycle, ProbeResult

log = get_logger(__name__)

_PROBED = (Lifecycle.starting, Lifecycle.running)


class EngineControl(Protocol):
    """What the probes need from the supervisor."""

    @property
    def engine_base_url(self) -> str: ...

    def request_restart(self, reason: str, detail: str = "") -> None: ...


class ProbeRunner:
    def __init__(
        self,
        cfg: ProbesConfig,
        engine_cfg: EngineConfig,
        status: EngineStatus,
        engine: EngineControl,
        *,
        promtool_names: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.status = status
        self.engine = engine
        self._clock = clock
        # many starved streams on a busy engine are a client's to cause: one line a minute
        self._idle_log = LogThrottle(60.0, clock)
        # trust_env=False: a proxy from the environment must never sit between us and loopback
        self._client = httpx.AsyncClient(trust_env=False, timeout=cfg.timeout_s)
        self.probe = InferenceProbe(
            self._client,
            prompt=cfg.prompt,
            timeout_s=cfg.timeout_s,
            model=configured_model_name(engine_cfg),
            api_key=engine_api_key(engine_cfg),
            clock=clock,
        )
        self.scraper = EngineMetricsScraper(
            self._client,
            timeout_s=min(cfg.timeout_s, max(cfg.metrics_interval_s, 0.5)),
            promtool_names=promtool_names,
            clock=clock,
        )
        self.stall = StallDetector(cfg.stall_window_s)
        self._gen = -1
        self._restart_requested = False
        self._not_ready_since: float | None = None
        self._last_probe_ok: bool | None = None
        self._last_ready: bool | None = None
        # set by the app when the proxy runs: () -> ((ok, detail), proxy.readiness mode)
        self.proxy_readiness: Callable[[], tuple[tuple[bool, str], str]] | None = None
        self.first_inference_at: float | None = None  # this generation's first good probe
        self._probe_sent_at: float | None = None  # the inference probe in flight, if any

    # ---- tasks ---------------------------------------------------------------
    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._probe_loop(), name="sentinel-probe-inference")
                tg.create_task(self._metrics_loop(), name="sentinel-probe-metrics")
                tg.create_task(self._watch_loop(), name="sentinel-probe-watch")
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _probe_loop(self) -> None:
        while True:
            t0 = time.monotonic()
            await self.probe_once()
            await asyncio.sleep(max(0.05, self.cfg.interval_s - (time.monotonic() - t0)))

    async def _metrics_loop(self) -> None:
        while True:
            t0 = time.monotonic()
            await self.scrape_once()
            wait = self.cfg.metrics_interval_s - (time.monotonic() - t0)
            await asyncio.sleep(max(0.05, wait))

    async def _watch_loop(self) -> None:
        period = min(0.5, self.cfg.interval_s)
        while True:
            self.sync_generation()
            self.evaluate()
            self.apply_actions()
            await asyncio.sleep(period)

    # ---- steps (public for tests and the benchmark) --------------------------
    def sync_generation(self) -> None:
        gen = self.status.generation
        if gen == self._gen:
            return
        self._gen = gen
        self.probe.reset()
        self.stall.reset()
        self.scraper.forget()
        self._restart_requested = False
        self._not_ready_since = None
        self._last_probe_ok = None
        self.first_inference_at = None

    async def probe_once(self) -> ProbeResult | None:
        self.sync_generation()
        if self.status.lifecycle not in _PROBED:
            return None
        gen = self._gen
        url = self.engine.engine_base_url
        self._probe_sent_at = self._clock()
        try:
            return await self._probe(gen, url)
        finally:
            self._probe_sent_at = None

    async def _probe(self, gen: int, url: str) -> ProbeResult | None:
        # the engine's counters as the probe goes out (read beside it, not before it):
        # were tokens computed while a probe waited, it waited behind the engine's load
        counters = None
        if self.first_inference_at is not None:
            counters = asyncio.ensure_future(self.scraper.scrape(url, gen))
        try:
            result = await self.probe.run(url)
        except BaseException:
            if counters is not None:
                counters.cancel()
            raise
        before = _work_done((await counters) or {}) if counters is not None else None
        if self.status.generation != gen or self.status.lifecycle not in _PROBED:
            return None  # the generation probed is gone; its result means nothing now
        if self.probe.timed_out and before is not None:
            result = await self._busy_or_failed(result, before, gen)
            if self.status.generation != gen:
                return None
        self._record(result)
        return result

    async def _busy_or_failed(self, result: ProbeResult, before: float, gen: int) -> ProbeResult:
        """A probe that timed out behind the engine's own load is not a hung engine: when
        a fresh look at the engine's counters shows tokens computed since the probe was
        sent, the engine is busy and can serve (requests queue), so the probe counts as
        passed, saying so. A hung engine computes nothing: the timeout stands (and the
        stall detector sees the unanswered probe as a running request)."""
        values = await self.scraper.scrape(self.engine.engine_base_url, gen)
        if values is None or self.status.generation != gen:
            return result
        self.status.set_engine_metrics(values)
        self._observe_progress(values)
        after = _work_done(values)
        if after is None or after <= before or self.status.stalled_reason:
            return result
        return ProbeResult(
            name=result.name,
            ok=True,
            at=result.at,
            latency_s=result.latency_s,
            detail=(
                f"busy: no answer within {self.probe.timeout_s:g}s behind the engine's own "
                f"load, but it computed {after - before:.0f} tokens meanwhile"
            ),
        )

    async def scrape_once(self) -> None:
        self.sync_generation()
        if self.status.lifecycle != Lifecycle.running:
            return
        gen = self._gen
        values = await self.scraper.scrape(self.engine.engine_base_url, gen)
        if values is None or self.status.generation != gen:
            return
        self.status.set_engine_metrics(values)
        self._observe_progress(values)

    def evaluate(self) -> tuple[bool, Checks]:
        """Recompute readiness now (also called by /readyz, so it is never stale)."""
        now = self._clock()
        ready, checks = evaluate_readiness(self.status, self.cfg, now, self._probe_sent_at)
        self.status.set_readiness(ready, checks)
        if ready or not self.status.loaded or self.status.lifecycle != Lifecycle.running:
            self._not_ready_since = None
        elif self._not_ready_since is None:
            self._not_ready_since = now
        if ready != self._last_ready:
            failed = {k: c["detail"] for k, c in checks.items() if not c["ok"]}
            if ready:
                log.info("engine ready", generation=self.status.generation)
            elif self._last_ready:
                log.warning("engine not ready", generation=self.status.generation, failed=failed)
            self._last_ready = ready
        return ready, checks

    def readiness_report(self) -> tuple[bool, dict[str, Any]]:
        """/readyz: readiness now, every check named, the failed ones listed, and why
        the engine is ``degraded`` (a hot or throttling GPU, an XID: information for
        routing and alerts, never a readiness failure)."""
        self.sync_generation()
        ready, checks = self.evaluate()
        if self.proxy_readiness is not None:  # issue 15: the proxy's word, per proxy.readiness
            ready, checks = pod_readiness(ready, checks, *self.proxy_readiness())
        return ready, {
            "state": self.status.state().value,
            "generation": self.status.generation,
            "failed": [k for k, c in checks.items() if not c["ok"]],
            "checks": checks,
            "degraded_reasons": self.status.degraded_reasons(),
        }

    def startup_report(self) -> tuple[bool, dict[str, Any]]:
        """/startupz: started once this generation's first real inference succeeded."""
        self.sync_generation()
        st = self.status
        body: dict[str, Any] = {"state": st.state().value, "generation": st.generation}
        now = self._clock()
        if self.first_inference_at is not None and st.loaded:
            body["loaded_at"] = self.first_inference_at
            if st.generation_started_at is not None:
                body["load_s"] = round(self.first_inference_at - st.generation_started_at, 3)
            return True, body
        lc = st.lifecycle
        if lc == Lifecycle.starting or (lc == Lifecycle.running and not st.loaded):
            since = st.generation_started_at
            age = f" for {now - since:.0f}s" if since is not None else ""
            reason = (
                f"engine generation {st.generation} is loading{age}: "
                "waiting for its first successful inference"
            )
        elif lc == Lifecycle.running:
            reason = "engine answers /health but no real inference has succeeded yet"
        elif lc == Lifecycle.restarting:
            last = st.restarts[-1] if st.restarts else None
            reason = "engine is restarting" + (f" (reason: {last.reason})" if last else "")
        elif lc == Lifecycle.failed:
            reason = f"engine failed: {st.failure_reason or 'see /status'}"
        else:
            reason = f"engine is {lc.value}"
        probe = st.probes.get(PROBE_NAME)
        if probe is not None and not probe.ok:
            body["last_probe"] = probe.detail
        body["reason"] = reason
        return False, body

    def apply_actions(self) -> None:
        if self._restart_requested or self.status.lifecycle != Lifecycle.running:
            return
        now = self._clock()
        stalled_since = self.stall.stalled_since
        if (
            self.cfg.on_stall == ProbeAction.restart
            and self.status.stalled_reason
            and stalled_since is not None
            and now - stalled_since >= self.cfg.stall_restart_after_s
        ):
            self._restart("stalled", self.status.stalled_reason)
            return
        if (
            self.cfg.on_not_ready == ProbeAction.restart
            and self._not_ready_since is not None
            and now - self._not_ready_since >= self.cfg.not_ready_restart_after_s
        ):
            failed = [
                f"{k}: {c['detail']}" for k, c in self.status.ready_checks.items() if not c["ok"]
            ]
            detail = f"not ready for {now - self._not_ready_since:.0f}s; " + "; ".join(failed)
            self._restart("not_ready", detail)

    def local_stream_idle(self, idle_s: float) -> None:
        """The proxy's word (issue 15): a stream from the local engine sent nothing for
        ``idle_s`` mid-stream. Counted, and fed to stall detection: the engine is
        ``stalled`` (reason ``stream_stalled``, readiness fails) at once unless a scrape
        saw tokens move meanwhile, and stays so until tokens move again; ``on_stall``
        counts from now. Streams of other tiers never come here (the app wires only the
        local tier's)."""
        self.sync_generation()
        if self.status.lifecycle != Lifecycle.running:
            return  # a generation on its way out (or not yet loaded) is not judged by it
        self.status.stream_stalls += 1
        reason = (
            f"stream_stalled: a stream from the engine got nothing for {idle_s:g}s "
            "mid-stream (proxy.stream_idle_timeout_s)"
        )
        stalled = self.stall.stream_idle(self._clock(), idle_s, reason)
        if stalled is None:
            extra = self._idle_log.allow()
            if extra is not None:
                log.info(
                    "local stream idle while tokens moved: the next scrape decides",
                    idle_s=idle_s,
                    **extra,
                )
            return
        if stalled != self.status.stalled_reason:
            log.warning("engine stalled", reason=stalled, generation=self.status.generation)
            self.status.set_stalled(stalled)
        self.evaluate()

    # ---- internals -----------------------------------------------------------
    def _restart(self, reason: str, detail: str) -> None:
        self._restart_requested = True
        log.warning(
            "requesting engine restart",
            reason=reason,
            detail=detail,
            generation=self.status.generation,
        )
        self.engine.request_restart(reason, detail)

    def _record(self, result: ProbeResult) -> None:
        self.status.record_probe(result)
        if result.ok and self.stall.answered() and self.status.stalled_reason:
            log.info("engine answered a probe after a stalled stream", latency_s=result.latency_s)
            self.status.set_stalled(None)
        if result.ok and self.first_inference_at is None:
            self.first_inference_at = result.at
            self.status.mark_loaded()  # no-op when the supervisor already saw /health
            started = self.status.generation_started_at
            load_s = round(result.at - started, 1) if started is not None else None
            log.info(
                "engine's first inference succeeded",
                generation=self.status.generation,
                load_s=load_s,
                probe_latency_s=result.latency_s,
            )
        elif result.ok != self._last_probe_ok and self.first_inference_at is not None:
            if result.ok:
                log.info("inference probe recovered", latency_s=result.latency_s)
            else:
                log.warning(
                    "inference probe failed", detail=result.detail, latency_s=result.latency_s
                )
        self._last_probe_ok = result.ok
        self.evaluate()

    def _observe_progress(self, values: dict[str, Any]) -> None:
        running = values.get(RUNNING)
        tokens = _work_done(values)
        if running is None or tokens is None:
            return  # an engine without these series: no stall detection
        # vLLM's running gauge is fed by the engine core and freezes with it, at times
        # before it counted the requests just handed over. The inference probe is a
        # request of Sentinel's own: unanswered by an engine that has answered one
        # (a loading engine is not stalled), it is running whatever the gauge says.
        if self.first_inference_at is not None and self.probe.unanswered:
            running = max(running, 1.0)
        reason = self.stall.observe(self._clock(), running, tokens)
        if reason != self.status.stalled_reason:
            if reason:
                log.warning("engine stalled", reason=reason, generation=self.status.generation)
            else:
                log.info("engine progressing again", generation=self.status.generation)
            self.status.set_stalled(reason)


def _work_done(values: dict[str, Any]) -> float | None:
    """Tokens the engine has computed (prompt + generated), from its counters; None when
    the engine exports no such series."""
    tokens = values.get(GENERATION_TOKENS)
    if tokens is None:
        return None
    return tokens + values.get(PROMPT_TOKENS, 0.0)
