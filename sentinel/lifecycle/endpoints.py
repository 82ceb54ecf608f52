"""Admin endpoints of the lifecycle (behind the admin token, see ``sentinel.ops.admin``):

- ``POST /admin/drain[?wait=true]``   stop taking traffic, keep the engine; with wait,
                                      answer once requests in flight are done
- ``GET  /admin/drain``               the drain's state
- ``POST /admin/resume``              end a drain asked for by hand
- ``POST /admin/restart[?wait=true]`` drain, replace the engine, wait until it serves,
                                      resume
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sentinel.lifecycle.drain import DrainController, LifecycleError
from sentinel.ops.admin import AdminRoutes

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _flag(request: Request, name: str, default: bool) -> bool:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ValueError(f"query parameter {name} must be true or false, got {raw!r}")


def add_lifecycle_routes(routes: AdminRoutes, drain: DrainController) -> None:
    async def run(request: Request, op: str) -> Response:
        unknown = sorted(set(request.query_params) - {"wait"})
        if unknown:
            return JSONResponse({"error": f"unknown query parameters: {unknown}"}, 400)
        try:
            if op == "drain":
                return JSONResponse(await drain.drain(_flag(request, "wait", True)))
            if op == "resume":
                return JSONResponse(await drain.resume())
            return JSONResponse(await drain.restart(_flag(request, "wait", True)))
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, 400)
        except LifecycleError as exc:
            return JSONResponse({"error": str(exc), **drain.describe()}, 409)

    async def drain_ep(request: Request) -> Response:
        if request.method == "GET":
            return JSONResponse(drain.describe())
        return await run(request, "drain")

    async def resume_ep(request: Request) -> Response:
        return await run(request, "resume")

    async def restart_ep(request: Request) -> Response:
        return await run(request, "restart")

    routes.add("/admin/drain", drain_ep, methods=("GET", "POST"))
    routes.add("/admin/resume", resume_ep)
    routes.add("/admin/restart", restart_ep)
