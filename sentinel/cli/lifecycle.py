"""`sentinel drain`, `sentinel resume`, `sentinel restart`: the admin API's lifecycle
operations (see sentinel.lifecycle.endpoints), authenticated with the admin token.

Without ``--timeout``, `drain` and `restart` wait as long as the server itself may take
(its ``lifecycle.drain_timeout_s``, and for a restart ``supervisor.stop_grace_s`` and
``supervisor.startup_timeout_s``, read from its /status) plus ``MARGIN_S``: a drain that
is still legitimately running is never given up on. A server that does not say gets
``FALLBACK_S``."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from sentinel.cli.admin_client import (
    AdminCallError,
    ConfigOpt,
    TokenFileOpt,
    UrlOpt,
    admin_client,
    fail,
    resolve_url,
)
from sentinel.logs import strip_terminal_controls

MARGIN_S = 30.0
FALLBACK_S = {"drain": 120.0, "restart": 1200.0}
NO_WAIT_S = 10.0
StatusTimeoutOpt = Annotated[
    float | None,
    typer.Option(
        help="Seconds to wait for the answer (default: as long as the server's own drain, "
        "stop and start limits allow, from its /status, plus 30 s).",
        min=0.1,
    ),
]
WaitOpt = Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until it is done.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the answer as JSON.")]


def _number(doc: Any, section: str, key: str) -> float | None:
    value = doc.get(section, {}).get(key) if isinstance(doc.get(section), dict) else None
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
    return float(value) if ok and value != float("inf") else None


def server_timeout(op: str, url: str, config: Any) -> float:
    """How long ``op`` (drain or restart, waiting) may take on the server, plus MARGIN_S."""
    from sentinel.cli.status import StatusUnavailable, fetch_status

    try:
        doc = fetch_status(resolve_url(url, config), NO_WAIT_S)
    except (StatusUnavailable, AdminCallError):
        return FALLBACK_S[op]  # the call itself says what is wrong
    cfg = doc.get("config") if isinstance(doc.get("config"), dict) else {}
    drain = _number(cfg, "lifecycle", "drain_timeout_s")
    if drain is None:
        return FALLBACK_S[op]
    if op == "drain":
        return drain + MARGIN_S
    startup = _number(cfg, "supervisor", "startup_timeout_s")
    if startup is None:
        return max(FALLBACK_S[op], drain + MARGIN_S)
    stop = _number(cfg, "supervisor", "stop_grace_s") or 0.0
    return drain + stop + startup + MARGIN_S


def _call(
    name: str,
    method: str,
    path: str,
    *,
    url: str,
    config: Any,
    token_file: Any,
    timeout: float | None,
    wait: bool | None,
) -> dict[str, Any]:
    params = {} if wait is None else {"wait": "true" if wait else "false"}
    if timeout is None:
        timeout = server_timeout(name, url, config) if wait else NO_WAIT_S
    try:
        with admin_client(url, config, token_file, timeout) as client:
            return client.request(method, path, params=params)
    except AdminCallError as exc:
        raise fail(name, exc) from None


def _echo(text: str) -> None:
    """Print what the server sent without anything a terminal obeys."""
    typer.echo(strip_terminal_controls(text))


def _show(doc: dict[str, Any], as_json: bool, headline: str) -> None:
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    _echo(headline)
    last = doc.get("last_drain")
    if last:
        _echo(
            f"  last drain: {last['outcome']} in {last['seconds']}s "
            f"({last['left_in_flight']} requests still in flight at its end)"
        )
    _echo(f"  state: {doc.get('state')}, generation {doc.get('generation')}")


def register(app: typer.Typer) -> None:
    @app.command()
    def drain(
        url: UrlOpt = "",
        config: ConfigOpt = None,
        token_file: TokenFileOpt = None,
        wait: WaitOpt = True,
        timeout: StatusTimeoutOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Stop taking traffic (readiness fails, new requests go to the next tier or get
        503), keep the engine running; `sentinel resume` ends it."""
        doc = _call(
            "drain", "POST", "/admin/drain",
            url=url, config=config, token_file=token_file, timeout=timeout, wait=wait,
        )  # fmt: skip
        _show(doc, as_json, f"draining ({doc.get('in_flight')} requests in flight)")

    @app.command()
    def resume(
        url: UrlOpt = "",
        config: ConfigOpt = None,
        token_file: TokenFileOpt = None,
        timeout: Annotated[
            float, typer.Option(help="Seconds to wait for an answer.", min=0.1)
        ] = 10.0,
        as_json: JsonOpt = False,
    ) -> None:
        """End a drain asked for by hand: take traffic again."""
        doc = _call(
            "resume", "POST", "/admin/resume",
            url=url, config=config, token_file=token_file, timeout=timeout, wait=None,
        )  # fmt: skip
        _show(doc, as_json, "resumed: taking traffic")

    @app.command()
    def restart(
        url: UrlOpt = "",
        config: ConfigOpt = None,
        token_file: TokenFileOpt = None,
        wait: WaitOpt = True,
        timeout: StatusTimeoutOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Drain, replace the engine, wait until the new one serves, resume. With a backup
        tier configured, no request fails meanwhile."""
        doc = _call(
            "restart", "POST", "/admin/restart",
            url=url, config=config, token_file=token_file, timeout=timeout, wait=wait,
        )  # fmt: skip
        if doc.get("restart") == "done":
            _show(doc, as_json, f"restarted in {doc.get('seconds')}s: taking traffic")
        else:
            _show(doc, as_json, "restart started (see `sentinel status`)")
