"""Assemble probes, collectors and the ops server for one Sentinel (called by app.py).

engine -> ProbeRunner (inference probe, engine /metrics scrape) -> EngineStatus
EngineStatus + psutil + loop heartbeat -> collectors -> registry -> /metrics
EngineStatus + ProbeRunner -> /livez /startupz /readyz /status
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry

from sentinel.collectors.process import ProcessCollector
from sentinel.collectors.sentinel_metrics import EngineStatusCollector
from sentinel.config import SentinelConfig
from sentinel.config.schema import EngineMetricNames
from sentinel.ops.admin import AdminAuth, AdminRoutes
from sentinel.ops.app import OpsDeps, build_ops_app
from sentinel.ops.heartbeat import LoopMonitor
from sentinel.ops.metrics import MetricsRenderer
from sentinel.ops.report import StatusReport
from sentinel.ops.server import OpsServer, ops_limits
from sentinel.probes.runner import EngineControl, ProbeRunner
from sentinel.state import EngineStatus


@dataclass
class OpsStack:
    probes: ProbeRunner
    loop_monitor: LoopMonitor
    metrics: MetricsRenderer
    report: StatusReport
    server: OpsServer
    # issue 16: admin endpoints (add with admin.add(path, handler, methods)); the token is
    # set on auth at start (Sentinel.run reads ops.admin)
    auth: AdminAuth
    admin: AdminRoutes

    def tasks(self) -> list[tuple[Coroutine[Any, Any, None], str]]:
        """The background coroutines, named; start them after ``server.bind()``."""
        return [
            (self.server.serve(), "ops-server"),
            (self.loop_monitor.run(), "loop-heartbeat"),
            (self.probes.run(), "probes"),
        ]


def engine_series_max_age_s(cfg: SentinelConfig) -> float:
    """The engine's series are passed through only while this fresh."""
    return max(3 * cfg.probes.metrics_interval_s, 5.0)


def drain_readiness(
    status: EngineStatus, report: tuple[bool, dict[str, Any]]
) -> tuple[bool, dict[str, Any]]:
    """/readyz during a drain (issue 16): 503 from its first moment, the drain named."""
    ready, body = report
    drain = status.drain
    if drain is None:
        return ready, body
    how = "next tier" if drain.fallback else "503 with Retry-After"
    body["checks"]["drain"] = {
        "ok": False,
        "detail": f"draining ({drain.reason}); new requests get the {how}",
    }
    body["failed"] = [*body["failed"], "drain"]
    body["state"] = "draining"
    return False, body


def unkillable_problem(status: EngineStatus, enabled: bool) -> str | None:
    """/livez fails while an engine process survives SIGKILL, where configured."""
    if not enabled or not status.unkillable:
        return None
    procs = ", ".join(
        f"pid {p['pid']} ({p['state']}, wchan {p['wchan']})" for p in status.unkillable
    )
    return (
        f"engine processes survive SIGKILL: {procs}; the node needs replacing "
        "(lifecycle.livez_fails_on_unkillable)"
    )


def build_ops_stack(
    cfg: SentinelConfig,
    status: EngineStatus,
    registry: CollectorRegistry,
    engine: EngineControl,
    *,
    log_tail: Callable[[], Sequence[str]] | None = None,
) -> OpsStack:
    probes = ProbeRunner(
        cfg.probes,
        cfg.engine,
        status,
        engine,
        promtool_names=cfg.ops.engine_metric_names == EngineMetricNames.promtool,
    )
    loop_monitor = LoopMonitor()
    for collector in (
        EngineStatusCollector(status),
        ProcessCollector(status),
        probes.scraper,
        loop_monitor,
    ):
        registry.register(collector)

    max_age = engine_series_max_age_s(cfg)

    def engine_series() -> str:
        return probes.scraper.passthrough_text(status.generation, max_age)

    metrics = MetricsRenderer(
        registry, engine_series if cfg.ops.passthrough_engine_metrics else None
    )
    auth = AdminAuth(registry)
    admin = AdminRoutes()
    server_box: list[OpsServer] = []
    report = StatusReport(
        status,
        cfg,
        engine_base_url=lambda: engine.engine_base_url,
        log_tail=log_tail,
        extras=lambda: {"ops_url": server_box[0].url, "loop": loop_monitor.info()},
    )
    app = build_ops_app(
        OpsDeps(
            loop=loop_monitor,
            heartbeat_timeout_s=cfg.ops.livez_heartbeat_timeout_s,
            startup=probes.startup_report,
            readiness=lambda: drain_readiness(status, probes.readiness_report()),
            livez_problem=lambda: unkillable_problem(
                status, cfg.lifecycle.livez_fails_on_unkillable
            ),
            report=report,
            metrics=metrics,
            auth=auth,
            admin=admin,
        )
    )
    server = OpsServer(
        app, cfg.ops.host, cfg.ops.port, limits=ops_limits(cfg.ops.limits), registry=registry
    )
    server_box.append(server)
    return OpsStack(probes, loop_monitor, metrics, report, server, auth, admin)
