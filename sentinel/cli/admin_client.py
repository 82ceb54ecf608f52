"""An authenticated client for Sentinel's admin API, for CLI commands.

The ops URL: ``--url``, else ``SENTINEL_OPS_URL``, else the config's ``ops.host``/``ops.port``
(a wildcard host means this machine), else ``http://127.0.0.1:8090``.
The token: ``--token-file``, else the config's ``ops.admin.token_file`` / ``token_env`` (the
same place the server reads it from).

Every failure is an ``AdminCallError`` whose message says what to do; ``call`` turns it
into a message on stderr and exit status 2 (bad input, unreachable) or 3 (refused).

``--timeout`` is a deadline for the whole answer (``bounded_request``), not per read: a
server that trickles its answer a byte at a time cannot keep a command waiting past it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Annotated, Any

import httpx
import typer

from sentinel.config import ConfigError, load_config
from sentinel.logs import strip_terminal_controls
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


class _DeadlinePassed(Exception):
    pass


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """SIGALRM at the deadline, for what the check between chunks cannot see (a server that
    trickles its status line and headers); only in a CLI's main thread, when no other alarm
    is in use (a test runner's timeout, say)."""
    usable = (
        seconds > 0
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, None)
        and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    )
    if not usable:
        yield
        return

    def on_alarm(_signum: int, _frame: object) -> None:
        raise _DeadlinePassed

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)


def bounded_request(
    client: httpx.Client,
    method: str,
    url: str,
    *,
    timeout: float,
    sink: IO[bytes] | None = None,
    **kw: Any,
) -> tuple[int, bytes]:
    """Send a request; its status code and body (written to ``sink`` instead, when given).

    ``timeout`` bounds the whole exchange, reading included: the body is read chunk by chunk
    and the clock checked between chunks (each read itself waits ``timeout`` at most), and in
    a CLI's main thread an alarm covers the status line and headers too, so a trickling
    server is given up on. Raises ``httpx.TimeoutException`` past the deadline and the other
    ``httpx.HTTPError`` as httpx does."""
    deadline = time.monotonic() + timeout
    body = bytearray()
    late = httpx.ReadTimeout(f"no whole answer within {timeout:g}s")
    try:
        with _alarm(timeout), client.stream(method, url, timeout=timeout, **kw) as resp:
            for chunk in resp.iter_bytes():
                if sink is not None:
                    sink.write(chunk)
                else:
                    body += chunk
                if time.monotonic() > deadline:
                    raise late
    except _DeadlinePassed:
        raise late from None
    return resp.status_code, bytes(body)


class AdminClient:
    def __init__(self, url: str, token: str, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
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
            status_code, raw = bounded_request(
                self._client, method, path, timeout=timeout or self.timeout, **kw
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
            body = json.loads(raw)
        except ValueError:
            body = {"error": raw[:300].decode(errors="replace")}
        if not isinstance(body, dict):
            body = {"answer": body}
        if status_code in (401, 403):
            raise AdminCallError(
                f"Sentinel refused {method} {path} (HTTP {status_code}): {body.get('error', '')}",
                code=3,
            )
        if status_code >= 400:
            raise AdminCallError(
                f"{method} {path} failed (HTTP {status_code}): "
                f"{body.get('error') or body.get('detail') or body}",
                code=1,
            )
        return body

    def download(self, path: str, output: Path, **kw: Any) -> None:
        """GET ``path`` into the file ``output`` within the client's timeout."""
        try:
            with open(output, "wb") as f:
                code, _ = bounded_request(
                    self._client, "GET", path, timeout=self.timeout, sink=f, **kw
                )
        except OSError as exc:
            raise AdminCallError(f"cannot write {output}: {exc}") from None
        except httpx.TimeoutException:
            output.unlink(missing_ok=True)  # no half a bundle left behind
            raise AdminCallError(
                f"Sentinel at {self.url} did not send GET {path} in time (--timeout)"
            ) from None
        except httpx.HTTPError as exc:
            output.unlink(missing_ok=True)
            raise AdminCallError(f"download failed: {exc}") from None
        if code != 200:
            output.unlink(missing_ok=True)
            raise AdminCallError(f"download failed (HTTP {code})", code=1)


def resolve_url(url: str, config: Path | None) -> str:
    """The ops server's URL (see the module's doc); ``AdminCallError`` when it is malformed."""
    if url:
        return check_url(url, "--url")
    env = os.environ.get("SENTINEL_OPS_URL")
    if env:
        return check_url(env, "SENTINEL_OPS_URL")
    if config is not None:
        cfg = _load(config)
        return local_url(cfg.ops.host, cfg.ops.port)
    return "http://127.0.0.1:8090"


def check_url(url: str, where: str) -> str:
    """``url`` when it is an http(s) URL with a host, else ``AdminCallError`` naming the fault."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        problem = str(exc)
    else:
        if parsed.scheme not in ("http", "https"):
            problem = "it must start with http:// or https://"
        elif not parsed.host:
            problem = "it names no host"
        else:
            return url
    raise AdminCallError(f"bad {where} {url!r}: {problem} (e.g. http://127.0.0.1:8090)")


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
    typer.echo(f"sentinel {command}: {strip_terminal_controls(str(exc))}", err=True)
    return typer.Exit(exc.code)
