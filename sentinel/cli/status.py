"""`sentinel status`: the ops server's /status as tables for a person, or raw JSON."""

from __future__ import annotations

import json
import math
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


def _num(value: object) -> float | None:
    """``value`` as a number when it is one (a server may send anything: never a TypeError)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: object) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _shown(value: object, fmt: str) -> str:
    """A number formatted with ``fmt``; anything else as itself; nothing as "-"."""
    n = _num(value)
    if n is not None:
        return fmt.format(n)
    return "-" if value is None else _e(value)


def _ts(at: object) -> str:
    n = _num(at)
    if n is None:
        return _shown(at, "")
    try:
        return datetime.fromtimestamp(n, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return _e(at)


def _ago(at: object, now: float) -> str:
    n = _num(at)
    return _shown(at, "") if n is None else f"{max(0.0, now - n):.1f}s ago"


def _ok(ok: bool) -> str:
    return "[green]ok[/]" if ok else "[red]FAIL[/]"


def _attach_line(attach: dict[str, Any]) -> str:
    found = _dict(attach.get("pids"))
    pids = ", ".join(f"{role} {' '.join(map(str, _list(p)))}" for role, p in found.items())
    line = f"attach to {_e(attach.get('base_url'))}; pids: {_e(pids or 'none found')}; "
    line += f"recovery {'on' if attach.get('recovery') else 'off'}"
    if found and not attach.get("verified", True):
        line += " [yellow](engine not verified on its port: never signalled)[/]"
    if attach.get("recoveries"):
        line += f", done {_e(attach['recoveries'])}"
    if attach.get("last_refusal"):
        line += f", last not done: {_e(attach['last_refusal'])}"
    if attach.get("problem"):
        line += f"\n[red]{_e(attach['problem'])}[/]"
    return line


def render(doc: dict[str, Any], console: Console) -> None:
    """The status document as tables; a value of an unexpected type is shown as itself."""
    now = _num(doc.get("now")) or time.time()
    state = str(doc.get("state", "?"))
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("state", f"[{_STATE_STYLE.get(state, 'bold')}]{_e(state)}[/]")
    summary.add_row("ready", _ok(doc.get("ready") is True))
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
    for source, reason in _dict(doc.get("degraded_reasons")).items():
        summary.add_row(f"degraded ({_e(source)})", f"[yellow]{_e(reason)}[/]")
    metrics = _dict(doc.get("engine_metrics"))
    if metrics:
        summary.add_row(
            "engine",
            ", ".join(
                f"{_e(k.split(':', 1)[-1])}={_shown(v, '{:g}')}"
                for k, v in metrics.items()
                if v is not None
            ),
        )
    attach = _dict(doc.get("attach"))  # issue 18: an engine Sentinel did not launch
    if attach:
        summary.add_row("mode", _attach_line(attach))
    sentinel = _dict(doc.get("sentinel"))
    if sentinel:
        summary.add_row(
            "sentinel",
            _e(
                f"pid {sentinel.get('pid')}, up {sentinel.get('uptime_s')}s, "
                f"version {sentinel.get('version')}"
            ),
        )
    console.print(summary)

    checks = _dict(doc.get("ready_checks"))
    if checks:
        table = Table(title="Readiness checks", title_justify="left")
        for col in ("check", "result", "detail"):
            table.add_column(col)
        for name, check in checks.items():
            check = check if isinstance(check, dict) else {"detail": check}
            table.add_row(_e(name), _ok(check.get("ok") is True), _e(check.get("detail", "")))
        console.print(table)

    procs = _list(doc.get("processes"))
    if procs:
        table = Table(title="Engine processes", title_justify="left")
        for col in ("role", "pid", "generation", "started"):
            table.add_column(col)
        for p in procs:
            p = p if isinstance(p, dict) else {"role": p}
            table.add_row(
                _e(p.get("role")),
                _e(p.get("pid")),
                _e(p.get("generation")),
                _ts(p.get("create_time")),
            )
        console.print(table)

    probes = _dict(doc.get("probes"))
    if probes:
        table = Table(title="Probes", title_justify="left")
        for col in ("probe", "result", "latency", "age", "detail"):
            table.add_column(col)
        for name, pr in probes.items():
            pr = pr if isinstance(pr, dict) else {"detail": pr}
            lat, lat_s = pr.get("latency_s"), _num(pr.get("latency_s"))
            table.add_row(
                _e(name),
                _ok(pr.get("ok") is True),
                _shown(lat if lat_s is None else lat_s * 1000, "{:.0f} ms"),
                _shown(pr.get("age_s"), "{:.1f}s"),
                _e(pr.get("detail") or ""),
            )
        console.print(table)

    restarts = _list(doc.get("restarts"))
    if restarts:
        table = Table(
            title=f"Restarts (by reason: {_e(doc.get('restart_counts'))})", title_justify="left"
        )
        for col in ("when", "generation", "reason", "detail"):
            table.add_column(col)
        for r in restarts[-10:]:
            r = r if isinstance(r, dict) else {"detail": r}
            table.add_row(
                _ts(r.get("at")),
                _e(r.get("generation")),
                _e(r.get("reason")),
                _e(r.get("detail") or ""),
            )
        console.print(table)

    last_exit = _dict(doc.get("last_exit"))
    if last_exit:
        how = (
            f"signal {_e(last_exit.get('signal'))}"
            if last_exit.get("signal")
            else f"exit code {_e(last_exit.get('returncode'))}"
        )
        console.print(
            f"[bold]Last exit[/]: generation {_e(last_exit.get('generation'))}, pid "
            f"{_e(last_exit.get('pid'))}, {how}, {_ago(last_exit.get('at'), now)}: "
            f"{_e(last_exit.get('reason'))}: {_e(last_exit.get('cause'))}"
        )
    for line in _list(doc.get("log_tail")):
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
        try:
            render(doc, Console())
        except Exception as exc:  # noqa: BLE001 - an odd document is shown, never a traceback
            typer.echo(
                f"sentinel status: cannot draw this status as tables ({type(exc).__name__}); "
                "here it is as JSON",
                err=True,
            )
            typer.echo(json.dumps(doc, indent=2))
