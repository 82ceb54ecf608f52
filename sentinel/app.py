"""The one place that wires Sentinel together.

engine process -> supervisor, probes, collectors -> EngineStatus -> ops endpoints, metrics
request -> proxy -> degradation chain -> upstreams

Signal handlers only queue work for the supervisor's loop (as uvicorn's
supervisors do); nothing is acted on inside a handler.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from contextlib import suppress

from sentinel.config import SentinelConfig
from sentinel.incidents.logring import LogRing
from sentinel.logs import configure_logging, get_logger
from sentinel.ops.metrics import SentinelRegistry
from sentinel.runtime import raise_open_files_limit, tune_gc
from sentinel.state import EngineStatus

log = get_logger("sentinel.app")


class Sentinel:
    """Owns every component for one `sentinel run`."""

    def __init__(self, cfg: SentinelConfig, log_ring: LogRing | None = None) -> None:
        from sentinel.engine.attach import AttachedEngine
        from sentinel.engine.command import secret_env_names
        from sentinel.engine.supervisor import Supervisor

        self.cfg = cfg
        self.status = EngineStatus()
        self.registry = SentinelRegistry()  # its custom collectors never fail a scrape
        # the GPU helper (issue 4) may set self.supervisor.gpu_processes to its lister
        self.supervisor: Supervisor | AttachedEngine
        if cfg.engine.mode == "attach":  # issue 18: an engine Sentinel did not launch
            self.supervisor = AttachedEngine(cfg.engine, cfg.supervisor, self.status)
        else:
            self.supervisor = Supervisor(
                cfg.engine,
                cfg.supervisor,
                self.status,
                engine_lines=cfg.logging.engine_lines,
                # "loaded" means a first real inference passed: the probes decide it
                detect_load=False,
                # the engine never sees a variable the config reads a secret from
                withhold_env=secret_env_names(cfg),
                lifecycle=cfg.lifecycle,  # issue 16: state file, guard, unkillable, GPU release
            )
        # --- the engine's own API key (engine.api_key_env): probes and the local tier send
        # it; launch mode gives it to vLLM as VLLM_API_KEY (environment, not argv) ---
        from sentinel.engine.apikey import key_env_extender, load_engine_key
        from sentinel.proxy.secrets import SecretError

        self._startup_error: str | None = None
        try:
            engine_key = load_engine_key(cfg.engine)
        except SecretError as exc:
            engine_key, self._startup_error = None, str(exc)
        if engine_key is not None and cfg.engine.mode != "attach":
            self.supervisor.env_extenders.append(key_env_extender(engine_key))
        self._tasks: list[asyncio.Task[object]] = []
        # --- probes, ops server and metrics (issue 3) ---
        from sentinel.ops.stack import build_ops_stack

        self.ops = build_ops_stack(
            cfg, self.status, self.registry, self.supervisor, log_tail=self.supervisor.log_tail
        )
        # --- GPU telemetry (issue 4) ---
        from sentinel.collectors.gpu import GpuCollector, GpuPoller, gpu_processes

        self.gpu = GpuPoller(
            cfg.gpu,
            self.status,
            self.supervisor.owned_pids,
            gpu_indices=cfg.engine.gpu_indices,
        )
        self.registry.register(GpuCollector(lambda: self.gpu.snapshot))
        if cfg.gpu.mode != "off":  # a fresh NVML read; the supervisor runs it in a thread
            self.supervisor.gpu_processes = gpu_processes
        # --- watchdogs, stack dumps, incidents (issue 17) ---
        from sentinel.watchdogs.service import Watchdogs

        self.watchdogs = Watchdogs(
            cfg,
            self.status,
            self.registry,
            request_restart=self.supervisor.request_restart,
            gpu_snapshot=(lambda: self.gpu.snapshot) if cfg.gpu.mode != "off" else None,
            status_doc=lambda: self.ops.report.build(log_lines=0, authenticated=True),
            metrics_text=self.ops.metrics.render,
            engine_log=self.supervisor.log_tail,
            sentinel_log=log_ring.lines if log_ring is not None else list,
            extra_secrets=lambda: _admin_token_values(cfg),
        )
        self.supervisor.env_extenders.append(self.watchdogs.extend_engine_env)
        self.supervisor.before_hang_restart = self.watchdogs.capture_for_hang
        self.ops.report.sections["watchdogs"] = self.watchdogs.describe
        if isinstance(self.supervisor, AttachedEngine):  # issue 18: mode, discovered pids
            self.ops.report.sections["attach"] = self.supervisor.describe
            from sentinel.collectors.attach_metrics import AttachCollector

            self.registry.register(AttachCollector(self.supervisor.describe))
        from sentinel.watchdogs import admin as watchdog_admin

        watchdog_admin.register(self.ops.admin, self.watchdogs)
        # --- proxy and degradation chain (issue 5) ---
        self.proxy = None
        if cfg.proxy.enabled:
            from sentinel.proxy.service import ProxyService

            self.proxy = ProxyService(
                cfg.proxy,
                cfg.payload_log,
                self.status,
                self.registry,
                engine_base_url=lambda: self.supervisor.engine_base_url,
                engine_api_key=engine_key,
                # issue 15: a local stream idle mid-stream feeds the probes' stall detection
                on_local_stream_idle=self.ops.probes.local_stream_idle,
            )
        # --- lifecycle: drain, resume, restart, preemption notices (issue 16) ---
        from sentinel.lifecycle.drain import DrainController
        from sentinel.lifecycle.endpoints import add_lifecycle_routes
        from sentinel.lifecycle.preempt import PreemptionWatcher

        self.drain = DrainController(
            cfg.lifecycle,
            cfg.proxy if cfg.proxy.enabled else None,
            self.status,
            self.supervisor,
            self.proxy,
            self.registry,
            startup_timeout_s=cfg.supervisor.startup_timeout_s,
        )
        add_lifecycle_routes(self.ops.admin, self.drain)
        # issue 17: a leak restart drains first (watchdogs.leak.policy: restart)
        self.watchdogs.restart_leaks_through(lambda: self.drain.restart(wait=False))
        self.preemption = PreemptionWatcher(cfg.lifecycle.preemption, self.drain.on_preemption)

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):  # issue 16: drain first, then stop
            loop.add_signal_handler(sig, self.drain.on_sigterm, sig)
        loop.add_signal_handler(signal.SIGHUP, self.supervisor.request_restart, "sighup")
        # SIGCHLD only hurries reaping along: the supervisor watches the engine through
        # pidfds and reaps every second anyway. uvloop keeps SIGCHLD for itself.
        try:
            loop.add_signal_handler(signal.SIGCHLD, self.supervisor.notify_child_exit)
        except RuntimeError:
            log.debug("SIGCHLD is reserved by the event loop; reaping on pidfds and a timer")

    def _proxy_stopped(self, task: asyncio.Task[object]) -> None:  # issue 15
        if task.cancelled() or self.proxy is None:
            return
        exc = task.exception()
        why = f"{type(exc).__name__}: {exc}" if exc is not None else "the proxy task ended"
        self.proxy.failed = why
        log.error("proxy stopped serving", error=why, exc_info=exc)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._install_signals(loop)
        # --- start background components here: append their tasks to self._tasks ---
        if self._startup_error:  # engine.api_key_env names a variable that is not set
            log.error("cannot start", error=self._startup_error)
            return 2
        if self.proxy is not None:  # issue 5: tier keys and the traffic port, checked first
            from sentinel.proxy.service import ProxyStartError

            try:
                self.proxy.prepare()
            except ProxyStartError as exc:
                log.error("cannot start the proxy", error=str(exc))
                return 2
        # issue 16: the admin token (ops.admin), read once; a configured but unusable
        # source stops start-up with the key named
        from sentinel.ops.admin import AdminTokenError, read_token

        try:
            admin_cfg = self.cfg.ops.admin
            self.ops.auth.set_token(read_token(admin_cfg.token_file, admin_cfg.token_env))
        except AdminTokenError as exc:
            log.error("cannot start the admin API", error=str(exc))
            return 2
        if not self.ops.auth.enabled:
            log.info("admin API off: no ops.admin.token_file or ops.admin.token_env set")
        # issue 3: bind the ops port first (clear error, real port when 0), then serve
        from sentinel.ops.server import OpsBindError, report_task_crash

        try:
            self.ops.server.bind()
        except OpsBindError as exc:
            log.error("cannot start the ops server", error=str(exc))
            return 2
        tune_gc(self.cfg.runtime)  # everything long-lived exists now
        # every connection the caps allow fits under the open-file limit
        caps = self.cfg.ops.limits.max_connections
        if self.proxy is not None:
            caps += self.cfg.proxy.limits.max_connections
        raise_open_files_limit(caps)
        for coro, name in self.ops.tasks():
            task = asyncio.create_task(coro, name=name)
            task.add_done_callback(report_task_crash)
            self._tasks.append(task)
        self._tasks.append(asyncio.create_task(self.gpu.run(), name="gpu-poller"))  # issue 4
        self.watchdogs.open()  # issue 17: the agent's socket exists before the first launch
        for coro, name in self.watchdogs.tasks():
            task = asyncio.create_task(coro, name=name)
            task.add_done_callback(report_task_crash)
            self._tasks.append(task)
        if self.proxy is not None:  # issue 5
            self._tasks.append(asyncio.create_task(self.proxy.run(), name="proxy"))
            # issue 15: /readyz hears the proxy; a crash of its task is logged, fails readiness
            self.ops.probes.proxy_readiness = self.proxy.readiness
            self._tasks[-1].add_done_callback(self._proxy_stopped)
        for coro, name in ((self.drain.run(), "drain"), (self.preemption.run(), "preemption")):
            task = asyncio.create_task(coro, name=name)  # issue 16
            task.add_done_callback(report_task_crash)
            self._tasks.append(task)
        try:
            return await self.supervisor.run()
        finally:
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with suppress(asyncio.CancelledError):
                    await task
            self.watchdogs.close()  # issue 17


def _admin_token_values(cfg: SentinelConfig) -> list[str]:
    """issue 17: the admin token, so that no snapshot ever holds it."""
    from sentinel.ops.admin import AdminTokenError, read_token

    try:
        token = read_token(cfg.ops.admin.token_file, cfg.ops.admin.token_env)
    except AdminTokenError:
        return []
    return [token] if token else []


def run_sentinel(cfg: SentinelConfig) -> int:
    log_ring = LogRing(sys.stderr, cfg.incidents.log_lines)  # issue 17: for snapshots
    configure_logging(cfg.logging, stream=log_ring)  # type: ignore[arg-type]
    try:
        import uvloop
    except ImportError:
        return asyncio.run(Sentinel(cfg, log_ring).run())
    return uvloop.run(Sentinel(cfg, log_ring).run())
