"""`sentinel drain`, `sentinel resume`, `sentinel restart`: the admin API's lifecycle
operations (see sentinel.lifecycle.endpoints), authenticated with the admin token."""

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
)
from sentinel.logs import strip_terminal_controls

WaitOpt = Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until it is done.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the answer as JSON.")]


def _call(
    name: str,
    method: str,
    path: str,
    *,
    url: str,
    config: Any,
    token_file: Any,
    timeout: float,
    wait: bool | None,
) -> dict[str, Any]:
    params = {} if wait is None else {"wait": "true" if wait else "false"}
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
        timeout: Annotated[
            float, typer.Option(help="Seconds to wait for an answer.", min=0.1)
        ] = 120.0,
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
        timeout: Annotated[
            float, typer.Option(help="Seconds to wait for an answer.", min=0.1)
        ] = 1200.0,
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
