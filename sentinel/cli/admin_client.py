"""An authenticated client for Sentinel's admin API, for CLI commands.

The ops URL: ``--url``, else ``SENTINEL_OPS_URL``, else the config's ``ops.host``/``ops.port``
(a wildcard host means this machine), else ``http://127.0.0.1:8090``.
The token: ``--token-file``, else the config's ``ops.admin.token_file`` / ``token_env`` (the
same place the server reads it from).

Every failure is an ``AdminCallError`` whose message says what to do; ``call`` turns it
into a message on stderr and exit status 2 (bad input, unreachable) or 3 (refused).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from sentinel.config import ConfigError, load_config
from sentinel.net import local_url
from sentinel.ops.admin import AdminTokenError, read_token

UrlOpt = Annotated[str, typer.Option(help="Sentinel's ops server (env SENTINEL_OPS_URL).")]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Sentinel's YAML config (ops port, ops.admin token)."),
]
TokenFileOpt = Annotated[
    Path | None, typer.Option(help="File holding the admin token (else ops.admin of --config).")
]
TimeoutOpt = Annotated[float, typer.Option(help="Seconds to wait for an answer.", min=0.1)]


class AdminCallError(Exception):
    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


class AdminClient:
    def __init__(self, url: str, token: str, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self._client = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
            trust_env=False,
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def headers(self) -> dict[str, str]:
        return dict(self._client.headers)

    def request(
        self, method: str, path: str, *, timeout: float | None = None, **kw: Any
    ) -> dict[str, Any]:
        """Call an admin endpoint; its JSON answer, or ``AdminCallError`` saying why not."""
        try:
            resp = self._client.request(
                method,
                path,
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
                **kw,
            )
        except httpx.TimeoutException:
            raise AdminCallError(
                f"Sentinel at {self.url} did not answer {method} {path} in time (--timeout)"
            ) from None
        except httpx.HTTPError as exc:
            raise AdminCallError(
                f"cannot reach Sentinel's ops server at {self.url} ({type(exc).__name__}: {exc})."
                " Is `sentinel run` up, and is this its ops.host/ops.port? (use --url or --config)"
            ) from None
        try:
            body = resp.json()
        except ValueError:
            body = {"error": resp.text[:300]}
        if not isinstance(body, dict):
            body = {"answer": body}
        if resp.status_code in (401, 403):
            raise AdminCallError(
                f"Sentinel refused {method} {path} (HTTP {resp.status_code}): "
                f"{body.get('error', '')}",
                code=3,
            )
        if resp.status_code >= 400:
            raise AdminCallError(
                f"{method} {path} failed (HTTP {resp.status_code}): "
                f"{body.get('error') or body.get('detail') or body}",
                code=1,
            )
        return body


def resolve_url(url: str, config: Path | None) -> str:
    if url:
        return url
    env = os.environ.get("SENTINEL_OPS_URL")
    if env:
        return env
    if config is not None:
        cfg = _load(config)
        return local_url(cfg.ops.host, cfg.ops.port)
    return "http://127.0.0.1:8090"


def resolve_token(config: Path | None, token_file: Path | None) -> str:
    try:
        if token_file is not None:
            token = read_token(token_file, None)
        elif config is not None:
            admin = _load(config).ops.admin
            token = read_token(admin.token_file, admin.token_env)
        else:
            token = None
    except AdminTokenError as exc:
        raise AdminCallError(str(exc)) from None
    if token is None:
        where = f"{config} sets no ops.admin token" if config else "no --config given"
        raise AdminCallError(
            f"no admin token ({where}): pass --token-file, or --config with "
            "ops.admin.token_file / ops.admin.token_env set"
        )
    return token


def _load(config: Path) -> Any:
    try:
        return load_config(config)
    except ConfigError as exc:
        raise AdminCallError(str(exc)) from None


def admin_client(
    url: str = "", config: Path | None = None, token_file: Path | None = None, timeout: float = 10
) -> AdminClient:
    """Build the client from the CLI's options; ``AdminCallError`` when it cannot."""
    return AdminClient(resolve_url(url, config), resolve_token(config, token_file), timeout)


def fail(command: str, exc: AdminCallError) -> typer.Exit:
    typer.echo(f"sentinel {command}: {exc}", err=True)
    return typer.Exit(exc.code)
