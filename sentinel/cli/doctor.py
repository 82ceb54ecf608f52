"""`sentinel doctor`: pre-flight and live checks, each pass / warn / fail / skip with its
fix in one line. Needs no running engine or Sentinel.

Exit status: 0 when no check fails (warnings allowed), 1 when any fails, 2 for bad
usage (an unknown option or check name, a config that does not load).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from sentinel.config import ConfigError, load_config

_MARK = {"pass": "PASS", "warn": "WARN", "fail": "FAIL", "skip": "skip"}


def register(app: typer.Typer) -> None:
    @app.command()
    def doctor(
        config: Annotated[
            Path | None, typer.Option("--config", "-c", help="YAML config file to check.")
        ] = None,
        set_: Annotated[
            list[str] | None,
            typer.Option("--set", help="Override one key: section.key=value (repeatable)."),
        ] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
        check: Annotated[
            list[str] | None,
            typer.Option("--check", help="Run only this check (repeatable)."),
        ] = None,
    ) -> None:
        """Check the host, the config and the model before (or while) Sentinel runs.
        Exit 0: no failure; 1: a check failed; 2: bad usage."""
        from sentinel.doctor import CHECKS, run_checks
        from sentinel.doctor.checks import exit_status

        names = {n for n, _ in CHECKS}
        unknown = sorted(set(check or []) - names)
        if unknown:
            known = ", ".join(sorted(names))
            typer.echo(f"sentinel doctor: unknown check {unknown[0]!r}; checks: {known}", err=True)
            raise typer.Exit(2)
        try:
            cfg = load_config(config, sets=set_ or [])
        except ConfigError as exc:
            typer.echo(f"sentinel doctor: {exc}", err=True)
            raise typer.Exit(2) from None
        results = run_checks(cfg, only=set(check) if check else None)
        code = exit_status(results)
        if as_json:
            doc = {"status": "fail" if code else "pass", "checks": [r.as_dict() for r in results]}
            typer.echo(json.dumps(doc, indent=2))
        else:
            width = max(len(r.name) for r in results)
            for r in results:
                typer.echo(f"{_MARK[r.status.value]}  {r.name:<{width}}  {r.summary}")
                if r.fix and r.status.value in ("warn", "fail"):
                    typer.echo(f"      {'':<{width}}  fix: {r.fix}")
            counts = {s: sum(r.status.value == s for r in results) for s in _MARK}
            typer.echo(
                f"\n{counts['pass']} pass, {counts['warn']} warn, {counts['fail']} fail, "
                f"{counts['skip']} skipped"
            )
        raise typer.Exit(code)
