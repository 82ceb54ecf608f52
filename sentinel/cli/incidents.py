"""`sentinel dump` and `sentinel snapshot`: on-demand evidence through the admin API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from sentinel.cli.admin_client import (
    AdminCallError,
    AdminClient,
    ConfigOpt,
    TimeoutOpt,
    TokenFileOpt,
    UrlOpt,
    admin_client,
    fail,
)
from sentinel.logs import strip_terminal_controls

ROLES = ("api_server", "engine_core", "worker")


def _echo(text: str) -> None:
    """Print what the server sent (stacks, errors) without anything a terminal obeys."""
    typer.echo(strip_terminal_controls(text))


def register(app: typer.Typer) -> None:
    @app.command("dump")
    def dump(
        role: Annotated[
            str | None, typer.Option(help="Only this role: api_server, engine_core, worker.")
        ] = None,
        pid: Annotated[int | None, typer.Option(help="Only this engine process.", min=1)] = None,
        native: Annotated[
            bool, typer.Option("--native", help="Include native (C/C++) frames.")
        ] = False,
        as_json: Annotated[bool, typer.Option("--json", help="Print the answer as JSON.")] = False,
        url: UrlOpt = "",
        config: ConfigOpt = None,
        token_file: TokenFileOpt = None,
        timeout: TimeoutOpt = 60.0,
    ) -> None:
        """Stack dumps (py-spy) of every engine process, saved under incidents.dir."""
        if role is not None and pid is not None:
            typer.echo("sentinel dump: give --role or --pid, not both", err=True)
            raise typer.Exit(2)
        if role is not None and role not in ROLES:
            typer.echo(f"sentinel dump: --role must be one of {', '.join(ROLES)}", err=True)
            raise typer.Exit(2)
        body: dict[str, object] = {}
        if role is not None:
            body["role"] = role
        if pid is not None:
            body["pid"] = pid
        if native:
            body["native"] = True
        try:
            with admin_client(url, config, token_file, timeout) as client:
                doc = client.request("POST", "/admin/dump", json=body)
        except AdminCallError as exc:
            raise fail("dump", exc) from None
        if as_json:
            typer.echo(json.dumps(doc, indent=2))
            return
        stacks = doc.get("stacks") or {}
        for proc in doc.get("processes", []):
            key = f"{proc['role']}-{proc['pid']}"
            head = f"== {proc['role']} pid {proc['pid']}: {proc['outcome']} ({proc['seconds']}s)"
            _echo(head)
            if proc.get("error"):
                _echo(f"   {proc['error']}")
            if stacks.get(key):
                _echo(stacks[key].rstrip())
            typer.echo("")
        _echo(f"saved: {doc.get('path')}")
        if not all(p.get("ok") for p in doc.get("processes", [])):
            raise typer.Exit(1)

    @app.command("snapshot")
    def snapshot(
        output: Annotated[
            Path | None,
            typer.Option("--output", "-o", help="Also download the bundle to this file."),
        ] = None,
        url: UrlOpt = "",
        config: ConfigOpt = None,
        token_file: TokenFileOpt = None,
        timeout: TimeoutOpt = 60.0,
    ) -> None:
        """An incident bundle (tar.gz): status, redacted config, logs, stacks, GPU, metrics,
        restarts, versions, host facts; kept under incidents.dir."""
        try:
            with admin_client(url, config, token_file, timeout) as client:
                doc = client.request("POST", "/admin/snapshot")
                if output is not None:
                    _download(client, str(doc["name"]), output)
        except AdminCallError as exc:
            raise fail("snapshot", exc) from None
        typer.echo(f"snapshot: {doc['path']} ({doc['bytes']} bytes)")
        if output is not None:
            typer.echo(f"downloaded to {output}")


def _download(client: AdminClient, name: str, output: Path) -> None:
    client.download("/admin/snapshot", output, params={"name": name})
