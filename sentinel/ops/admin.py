"""The admin API on the ops port: endpoints that change state or reveal internals.

Every admin endpoint needs ``Authorization: Bearer <token>``. The token is read once at
start from ``ops.admin.token_file`` or the environment variable named by
``ops.admin.token_env`` and compared in constant time (``hmac.compare_digest``).

- no token configured: admin endpoints are off and answer 403 saying how to turn them on;
- a missing or wrong token: 401, counted in ``sentinel_admin_auth_failures_total``;
- the right token: the handler runs.

Other modules add endpoints through ``AdminRoutes.add(path, handler, methods)`` (the
``OpsStack.admin`` of this Sentinel), before or after the app is built: each is looked up
per request behind ``AdminAuth.check``.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sentinel.logs import LogThrottle, get_logger
from sentinel.proxy.secrets import SecretError, check_header_value

log = get_logger(__name__)

Handler = Callable[[Request], Awaitable[Response]]

HOW_TO_ENABLE = (
    "admin endpoints are off: no admin token is configured. Set ops.admin.token_file "
    "(a file holding the token) or ops.admin.token_env (the name of an environment "
    "variable holding it), restart Sentinel, and send 'Authorization: Bearer <token>'"
)
MIN_TOKEN_CHARS = 16
# a refusal is logged once a minute per reason (the rest are counted, and summed up in the
# next line): a client hammering /admin with wrong tokens cannot flush the log ring
REFUSAL_LOG_EVERY_S = 60.0


class AdminTokenError(Exception):
    """The configured token source cannot be read or holds no usable token."""


def read_token(
    token_file: Path | str | None,
    token_env: str | None,
    environ: Mapping[str, str] | None = None,
) -> str | None:
    """The admin token from its configured source; None when none is configured.

    Raises ``AdminTokenError`` naming the config key when a source is configured but
    missing, unreadable, empty, too short, or holding what cannot go into a header (a line
    break inside, a control or non-ASCII character). Shared by the server, the CLI and
    ``sentinel doctor``; ``environ``: where ``token_env`` is read (default: this process's)."""
    if token_file:
        path = Path(token_file).expanduser()
        try:
            token = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise AdminTokenError(f"ops.admin.token_file {str(path)!r} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise AdminTokenError(
                f"ops.admin.token_file {str(path)!r} cannot be read: {why}"
            ) from None
        where = f"ops.admin.token_file {str(path)!r}"
    elif token_env:
        value = (os.environ if environ is None else environ).get(token_env)
        if value is None:
            raise AdminTokenError(
                f"ops.admin.token_env names the environment variable {token_env!r}, "
                "which is not set"
            )
        token = value.strip()
        where = f"environment variable {token_env!r} (ops.admin.token_env)"
    else:
        return None
    if not token:
        raise AdminTokenError(f"{where} is empty")
    try:
        check_header_value(token, where)
    except SecretError as exc:
        raise AdminTokenError(
            f"{exc}: a token must be one line of printable ASCII (it is sent in a header)"
        ) from None
    if len(token) < MIN_TOKEN_CHARS:
        raise AdminTokenError(
            f"{where} holds a token of {len(token)} characters; use at least "
            f"{MIN_TOKEN_CHARS} (e.g. `openssl rand -hex 32`)"
        )
    return token


class AdminAuth:
    """Bearer-token check for admin endpoints, with its failure counter."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        token: str | None = None,
        throttle: LogThrottle | None = None,
    ) -> None:
        self._token: bytes | None = None
        self._throttle = throttle or LogThrottle(REFUSAL_LOG_EVERY_S)
        self.set_token(token)
        self.failures = Counter(
            "sentinel_admin_auth_failures",
            "Admin API requests refused for a missing or wrong bearer token.",
            ["reason"],
            registry=registry,
        )
        for reason in ("missing", "wrong"):
            self.failures.labels(reason)

    def set_token(self, token: str | None) -> None:
        self._token = token.encode() if token else None

    @property
    def enabled(self) -> bool:
        return self._token is not None

    def check(self, request: Request) -> Response | None:
        """None when the request may proceed, else the refusal to send."""
        if self._token is None:
            return JSONResponse({"error": HOW_TO_ENABLE}, status_code=403)
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            reason, msg = "missing", "admin endpoint: send 'Authorization: Bearer <token>'"
        elif hmac.compare_digest(given.strip().encode(), self._token):
            return None
        else:
            reason, msg = "wrong", "admin endpoint: the bearer token is not the admin token"
        self.failures.labels(reason).inc()
        extra = self._throttle.allow(reason)
        if extra is not None:
            log.warning(
                "admin request refused",
                path=request.url.path,
                reason=reason,
                client=request.client.host if request.client else None,
                **extra,
            )
        return JSONResponse(
            {"error": msg}, status_code=401, headers={"WWW-Authenticate": 'Bearer realm="sentinel"'}
        )


@dataclass
class _Entry:
    path: str
    handler: Handler
    methods: tuple[str, ...]


@dataclass
class AdminRoutes:
    """Admin endpoints registered by any module; built into the ops app, each guarded."""

    _entries: list[_Entry] = field(default_factory=list)

    def add(self, path: str, handler: Handler, methods: Sequence[str] = ("POST",)) -> None:
        if not path.startswith("/admin/"):
            raise ValueError(f"admin paths live under /admin/, got {path!r}")
        if any(e.path == path for e in self._entries):
            raise ValueError(f"admin path {path!r} is already registered")
        self._entries.append(_Entry(path, handler, tuple(m.upper() for m in methods)))

    @property
    def paths(self) -> list[str]:
        return [e.path for e in self._entries]

    def route(self, auth: AdminAuth) -> Route:
        """One route for everything under /admin/, looked up per request: endpoints
        registered after the app was built are served too."""

        async def dispatch(request: Request) -> Response:
            refused = auth.check(request)
            if refused is not None:
                return refused
            path = request.url.path.rstrip("/") or "/"
            if path == "/admin":
                return JSONResponse({"endpoints": {e.path: list(e.methods) for e in self._entries}})
            entry = next((e for e in self._entries if e.path == path), None)
            if entry is None:
                return JSONResponse(
                    {"error": f"no admin endpoint {path!r}; known: {self.paths}"}, 404
                )
            if request.method not in entry.methods:
                return JSONResponse(
                    {"error": f"{path} takes {', '.join(entry.methods)}, not {request.method}"},
                    405,
                    headers={"Allow": ", ".join(entry.methods)},
                )
            return await entry.handler(request)

        return Route(
            "/admin{rest:path}", dispatch, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]
        )
