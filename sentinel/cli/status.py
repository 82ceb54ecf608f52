"""`sentinel status`: the ops server's /status as tables for a person, or raw JSON."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sentinel.cli import admin_client
from sentinel.config.schema import OpsConfig
from sentinel.logs import strip_terminal_controls

DEFAULT_URL = f"http://127.0.0.1:{OpsConfig.model_fields['port'].default}"
_STATE_STYLE = {
    "ready": "bold green",
    "degraded": "bold yellow",
    "starting": "bold cyan",
    "restarting": "bold yellow",
    "draining": "bold yellow",
    "stalled": "bold red",
    "failed": "bold red",
    "stopped": "bold red",
}


class StatusUnavailable(Exception):
    pass


def fetch_status(
    url: str, timeout: float, log_tail: int = 0, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    target = url.rstrip("/") + "/status"
    params = {"log_tail": str(log_tail)} if log_tail else None
    try:
        with httpx.Client(trust_env=False) as client:
            code, raw = admin_client.bounded_request(
                client, "GET", target, timeout=timeout, params=params, headers=headers
            )
    except httpx.TimeoutException:
        raise StatusUnavailable(
            f"Sentinel at {url} did not answer GET /status in time (--timeout {timeout:g})"
        ) from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise StatusUnavailable(
            f"cannot reach Sentinel's ops server at {url} ({type(exc).__name__}: {exc}). "
            "Is `sentinel run` up, and is this its ops.host/ops.port? (use --url)"
        ) from None
    text = raw[:200].decode(errors="replace")
    if code != 200:
        raise StatusUnavailable(f"{target} answered HTTP {code}: {text}")
    try:
        body = json.loads(raw)
    except ValueError:
        raise StatusUnavailable(f"{target} did not answer JSON: {text!r}") from None
    if not isinstance(body, dict) or "state" not in body:
        raise StatusUnavailable(f"{target} answered JSON that is not a Sentinel status")
    return body


def _e(value: object) -> str:
    """Text from the server (engine error bodies, log lines) shown as itself, never as markup."""
    return escape(strip_terminal_controls(str(value)))


def _ts(at: float | None) -> str:
    if at is None:
        return "-"
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ago(at: float | None, now: float) -> str:
    if at is None:
        return "-"
    return f"{max(0.0, now - at):.1f}s ago"


def _ok(ok: bool) -> str:
    return "[green]ok[/]" if ok else "[red]FAIL[/]"


def _attach_line(attach: dict[str, Any]) -> str:
    pids = ", ".join(f"{role} {' '.join(map(str, p))}" for role, p in attach["pids"].items())
    line = f"attach to {_e(attach.get('base_url'))}; pids: {_e(pids or 'none found')}; "
    line += f"recovery {'on' if attach.get('recovery') else 'off'}"
    if attach["pids"] and not attach.get("verified", True):
        line += " [yellow](engine not verified on its port: never signalled)[/]"
    if attach.get("recoveries"):
        line += f", done {_e(attach['recoveries'])}"
    if attach.get("last_refusal"):
        line += f", last not done: {_e(attach['last_refusal'])}"
    if attach.get("problem"):
        line += f"\n[red]{_e(attach['problem'])}[/]"
    return line


def render(doc: dict[str, Any], console: Console) -> None:
    now = float(doc.get("now") or time.time())
    state = str(doc.get("state", "?"))
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("state", f"[{_STATE_STYLE.get(state, 'bold')}]{_e(state)}[/]")
    summary.add_row("ready", _ok(bool(doc.get("ready"))))
    summary.add_row(
        "lifecycle", f"{_e(doc.get('lifecycle'))} since {_ago(doc.get('lifecycle_since'), now)}"
    )
    summary.add_row(
        "generation",
        f"{_e(doc.get('generation'))} (started {_ago(doc.get('generation_started_at'), now)})",
    )
    summary.add_row("loaded", _ts(doc.get("loaded_at")))
    for key in ("failure_reason", "stalled_reason"):
        if doc.get(key):
            summary.add_row(key.replace("_", " "), f"[red]{_e(doc[key])}[/]")
    for source, reason in (doc.get("degraded_reasons") or {}).items():
        summary.add_row(f"degraded ({_e(source)})", f"[yellow]{_e(reason)}[/]")
    metrics = doc.get("engine_metrics") or {}
    if metrics:
        summary.add_row(
            "engine",
            _e(
                ", ".join(
                    f"{k.split(':', 1)[-1]}={v:g}" for k, v in metrics.items() if v is not None
                )
            ),
        )
    attach = doc.get("attach")  # issue 18: an engine Sentinel did not launch
    if attach:
        summary.add_row("mode", _attach_line(attach))
    sentinel = doc.get("sentinel") or {}
    if sentinel:
        summary.add_row(
            "sentinel",
            _e(
                f"pid {sentinel.get('pid')}, up {sentinel.get('uptime_s')}s, "
                f"version {sentinel.get('version')}"
            ),
        )
    console.print(summary)

    checks = doc.get("ready_checks") or {}
    if checks:
        table = Table(title="Readiness checks", title_justify="left")
        for col in ("check", "result", "detail"):
            table.add_column(col)
        for name, check in checks.items():
            table.add_row(_e(name), _ok(bool(check.get("ok"))), _e(check.get("detail", "")))
        console.print(table)

    procs = doc.get("processes") or []
    if procs:
        table = Table(title="Engine processes", title_justify="left")
        for col in ("role", "pid", "generation", "started"):
            table.add_column(col)
        for p in procs:
            table.add_row(
                _e(p.get("role")),
                _e(p.get("pid")),
                _e(p.get("generation")),
                _ts(p.get("create_time")),
            )
        console.print(table)

    probes = doc.get("probes") or {}
    if probes:
        table = Table(title="Probes", title_justify="left")
        for col in ("probe", "result", "latency", "age", "detail"):
            table.add_column(col)
        for name, pr in probes.items():
            lat = pr.get("latency_s")
            table.add_row(
                _e(name),
                _ok(bool(pr.get("ok"))),
                f"{lat * 1000:.0f} ms" if lat is not None else "-",
                f"{pr.get('age_s', 0):.1f}s",
                _e(pr.get("detail") or ""),
            )
        console.print(table)

    restarts = doc.get("restarts") or []
    if restarts:
        table = Table(
            title=f"Restarts (by reason: {_e(doc.get('restart_counts'))})", title_justify="left"
        )
        for col in ("when", "generation", "reason", "detail"):
            table.add_column(col)
        for r in restarts[-10:]:
            table.add_row(
                _ts(r.get("at")),
                _e(r.get("generation")),
                _e(r.get("reason")),
                _e(r.get("detail") or ""),
            )
        console.print(table)

    last_exit = doc.get("last_exit")
    if last_exit:
        how = (
            f"signal {_e(last_exit['signal'])}"
            if last_exit.get("signal")
            else f"exit code {_e(last_exit.get('returncode'))}"
        )
        console.print(
            f"[bold]Last exit[/]: generation {_e(last_exit.get('generation'))}, pid "
            f"{_e(last_exit.get('pid'))}, {how}, {_ago(last_exit.get('at'), now)}: "
            f"{_e(last_exit.get('reason'))}: {_e(last_exit.get('cause'))}"
        )
    for line in doc.get("log_tail") or []:
        console.print(strip_terminal_controls(str(line)), markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    @app.command()
    def status(
        url: Annotated[
            str, typer.Option(help="Sentinel's ops server (env SENTINEL_OPS_URL).")
        ] = "",
        as_json: Annotated[bool, typer.Option("--json", help="Print /status as JSON.")] = False,
        log_tail: Annotated[
            int, typer.Option(help="Also show this many engine log lines.", min=0)
        ] = 0,
        timeout: Annotated[
            float, typer.Option(help="Seconds to wait for an answer.", min=0.1)
        ] = 5.0,
        config: admin_client.ConfigOpt = None,
        token_file: admin_client.TokenFileOpt = None,
    ) -> None:
        """Show the engine's state: lifecycle, readiness checks, processes, probes, restarts.

        --log-tail is admin-only: the token comes from --token-file or --config."""
        try:
            target = admin_client.resolve_url(url, config)
            headers = None
            if log_tail:
                token = admin_client.resolve_token(config, token_file)
                headers = {"Authorization": f"Bearer {token}"}
            doc = fetch_status(target, timeout, log_tail, headers)
        except admin_client.AdminCallError as exc:
            raise admin_client.fail("status", exc) from None
        except StatusUnavailable as exc:
            typer.echo(f"sentinel status: {strip_terminal_controls(str(exc))}", err=True)
            raise typer.Exit(2) from None
        if as_json:
            typer.echo(json.dumps(doc, indent=2))
            return
        render(doc, Console())
