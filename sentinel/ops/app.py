"""The ops endpoints (Starlette). Each answers from in-memory state: none waits on the engine.

- ``/livez``    Sentinel's own event loop turns (heartbeat fresh). Never engine-dependent.
- ``/startupz`` 200 once the engine generation's first real inference succeeded; 503 before,
                with the reason.
- ``/readyz``   200 when every readiness check passes; 503 naming the failed checks.
- ``/status``   the whole observed state as JSON (``?log_tail=N`` adds engine log lines:
                admin only, see ``sentinel.ops.admin``).
- ``/admin/...`` endpoints registered in ``AdminRoutes`` (drain, resume, restart, ...),
                each behind the admin bearer token.
- ``/metrics``  Prometheus text format 0.0.4: ``sentinel_*`` plus the engine's series.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sentinel.ops.admin import AdminAuth, AdminRoutes
from sentinel.ops.heartbeat import LoopMonitor
from sentinel.ops.metrics import CONTENT_TYPE, MetricsRenderer
from sentinel.ops.report import StatusReport, finite

_MAX_LOG_LINES = 10_000


@dataclass
class OpsDeps:
    loop: LoopMonitor
    heartbeat_timeout_s: float
    startup: Callable[[], tuple[bool, dict[str, Any]]]
    readiness: Callable[[], tuple[bool, dict[str, Any]]]
    report: StatusReport
    metrics: MetricsRenderer
    livez_problem: Callable[[], str | None] | None = None
    auth: AdminAuth | None = None
    admin: AdminRoutes | None = None


def json_response(data: Any, status_code: int = 200) -> Response:
    body = json.dumps(finite(data), separators=(",", ":"), default=str, allow_nan=False)
    return Response(
        body,
        status_code=status_code,
        media_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def build_ops_app(deps: OpsDeps) -> Starlette:
    async def livez(_: Request) -> Response:
        alive, info = deps.loop.alive(deps.heartbeat_timeout_s)
        body = {"alive": alive, **info}
        if not alive:
            body["reason"] = (
                f"event loop heartbeat is {info['heartbeat_age_s']:.1f}s old "
                f"(limit {deps.heartbeat_timeout_s:g}s)"
            )
        problem = deps.livez_problem() if deps.livez_problem is not None else None
        if alive and problem:
            alive = False
            body["alive"], body["reason"] = False, problem
        return json_response(body, 200 if alive else 503)

    async def startupz(_: Request) -> Response:
        started, body = deps.startup()
        return json_response({"started": started, **body}, 200 if started else 503)

    async def readyz(_: Request) -> Response:
        ready, body = deps.readiness()
        return json_response({"ready": ready, **body}, 200 if ready else 503)

    async def status(request: Request) -> Response:
        raw = request.query_params.get("log_tail", "0")
        try:
            lines = min(max(int(raw), 0), _MAX_LOG_LINES)
        except ValueError:
            return json_response({"error": f"log_tail must be an integer, got {raw!r}"}, 400)
        # the engine's log lines (log_tail, last_exit.log_tail) are admin-only; a token
        # sent without log_tail is checked (and a wrong one counted) all the same
        sent = "authorization" in request.headers
        authenticated = deps.auth is None
        if deps.auth is not None and (lines or (sent and deps.auth.enabled)):
            refused = deps.auth.check(request)
            if refused is not None:
                return refused
            authenticated = True
        return json_response(deps.report.build(log_lines=lines, authenticated=authenticated))

    async def metrics(_: Request) -> Response:
        return Response(deps.metrics.render(), media_type=CONTENT_TYPE)

    async def index(_: Request) -> Response:
        endpoints = ["/livez", "/startupz", "/readyz", "/status", "/metrics"]
        if deps.admin is not None:
            endpoints += deps.admin.paths
        return json_response({"endpoints": endpoints})

    routes = [
        Route("/", index),
        Route("/livez", livez),
        Route("/startupz", startupz),
        Route("/readyz", readyz),
        Route("/status", status),
        Route("/metrics", metrics),
    ]
    if deps.auth is not None and deps.admin is not None:
        routes.append(deps.admin.route(deps.auth))
    return Starlette(routes=routes)
