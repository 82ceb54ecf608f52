"""Admin endpoints of the watchdogs (behind the admin token, issue 16's AdminRoutes).

- ``POST /admin/dump``      body ``{"role": R | "pid": P, "native": bool}`` (all optional):
  a py-spy dump of every engine process (or those asked for), saved as an incident and
  returned with each process's stack text.
- ``POST /admin/snapshot``  take a snapshot bundle; answers its name, path and size.
- ``GET  /admin/snapshot?name=N``  download bundle N (the newest without ``name``).
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

from sentinel.ops.admin import AdminRoutes
from sentinel.watchdogs.service import Watchdogs

ROLES = ("api_server", "engine_core", "worker", "other")
MAX_BODY = 4096


def _bad(msg: str) -> JSONResponse:
    return JSONResponse({"error": msg}, status_code=400)


async def _body(request: Request) -> dict[str, Any] | JSONResponse:
    raw = await request.body()
    if len(raw) > MAX_BODY:
        return _bad(f"body too large ({len(raw)} bytes; at most {MAX_BODY})")
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError as exc:
        return _bad(f"body is not JSON: {exc}")
    except RecursionError:  # "[[[[..." deeper than Python's parser goes
        return _bad("body is not JSON this API accepts: it is nested too deeply")
    if not isinstance(body, dict):
        return _bad("body must be a JSON object")
    return body


def register(routes: AdminRoutes, dogs: Watchdogs) -> None:
    async def dump(request: Request) -> Response:
        body = await _body(request)
        if isinstance(body, Response):
            return body
        unknown = sorted(set(body) - {"role", "pid", "native"})
        if unknown:
            return _bad(f"unknown field(s) {unknown}; known: role, pid, native")
        role, pid, native = body.get("role"), body.get("pid"), body.get("native")
        if role is not None and role not in ROLES:
            return _bad(f"role must be one of {list(ROLES)}, got {role!r}")
        if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0):
            return _bad(f"pid must be a positive integer, got {pid!r}")
        if role is not None and pid is not None:
            return _bad("give role or pid, not both")
        if native is not None and not isinstance(native, bool):
            return _bad(f"native must be true or false, got {native!r}")
        if not dogs.pyspy.available:
            return JSONResponse({"error": dogs.pyspy.describe()["detail"]}, status_code=503)
        cap = await dogs.dump(role=role, pid=pid, native=native)
        doc = cap.record()
        doc["stacks"] = {f"{r.role}-{r.pid}": r.text if r.ok else None for r in cap.results}
        status = 200 if cap.results else 404
        return JSONResponse(doc, status_code=status)

    async def snapshot(request: Request) -> Response:
        if request.method == "GET":
            name = request.query_params.get("name")
            entries = [p for p in dogs.store.entries() if p.name.endswith(".tar.gz")]
            if name is None:
                if not entries:
                    return JSONResponse({"error": "no snapshot taken yet"}, status_code=404)
                path = entries[-1]
            else:
                path = next((p for p in entries if p.name == name), None)
                if path is None:
                    return JSONResponse(
                        {"error": f"no snapshot named {name!r} in {dogs.store.dir}"},
                        status_code=404,
                    )
            return FileResponse(path, media_type="application/gzip", filename=path.name)
        body = await _body(request)
        if isinstance(body, Response):
            return body
        if body:
            return _bad(f"POST /admin/snapshot takes no fields, got {sorted(body)}")
        try:
            path = await dogs.snapshot("operator")
        except OSError as exc:
            return JSONResponse(
                {"error": f"cannot write the snapshot under {dogs.store.dir}: {exc}"},
                status_code=500,
            )
        return JSONResponse({"name": path.name, "path": str(path), "bytes": path.stat().st_size})

    routes.add("/admin/dump", dump, ("POST",))
    routes.add("/admin/snapshot", snapshot, ("POST", "GET"))
