"""`sentinel` entry point: subcommands are registered here, implemented beside it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from sentinel.config import ConfigError, default_yaml_text, load_config

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Sentinel: launch and guard a vLLM inference server.",
)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config file (see `sentinel config`).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override one key: section.key=value (repeatable)."),
]


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def run(
    ctx: typer.Context,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    model: Annotated[str | None, typer.Option(help="engine.model")] = None,
    ops_port: Annotated[int | None, typer.Option(help="ops.port")] = None,
    proxy_port: Annotated[int | None, typer.Option(help="proxy.port")] = None,
) -> None:
    """Launch the engine and guard it. Anything after `--` is the engine command, verbatim."""
    overrides: dict[str, object] = {}
    if model is not None:
        overrides["engine.model"] = model
    if ops_port is not None:
        overrides["ops.port"] = ops_port
    if proxy_port is not None:
        overrides["proxy.port"] = proxy_port
    if ctx.args:
        if ctx.args[0].startswith("-"):
            typer.echo(
                f"sentinel: unknown option {ctx.args[0]!r} for `sentinel run`; "
                "an engine command goes after `--` (see `sentinel run --help`)",
                err=True,
            )
            raise typer.Exit(2)
        overrides["engine.command"] = list(ctx.args)
    try:
        cfg = load_config(config, sets=set_ or [], overrides=overrides)
    except ConfigError as exc:
        typer.echo(f"sentinel: {exc}", err=True)
        raise typer.Exit(2) from None

    from sentinel.app import run_sentinel

    raise typer.Exit(run_sentinel(cfg))


@app.command("config")
def config_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    check: Annotated[bool, typer.Option(help="Validate and print the effective config.")] = False,
) -> None:
    """Print the documented default configuration, or validate one (--check)."""
    if not check:
        typer.echo(default_yaml_text(), nl=False)
        return
    try:
        cfg = load_config(config, sets=set_ or [])
    except ConfigError as exc:
        typer.echo(f"sentinel: {exc}", err=True)
        raise typer.Exit(2) from None
    import yaml

    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), nl=False)


def _register_optional() -> None:
    """Subcommands implemented in their own modules."""
    from sentinel.cli import gpu as gpu_cli
    from sentinel.cli import status as status_cli

    status_cli.register(app)
    gpu_cli.register(app)
    # sentinel doctor (issue 16)
    from sentinel.cli import doctor as doctor_cli

    doctor_cli.register(app)
    from sentinel.cli import incidents as incidents_cli  # issue 17: dump, snapshot

    incidents_cli.register(app)
    from sentinel.cli import lifecycle as lifecycle_cli  # issue 16: drain, resume, restart

    lifecycle_cli.register(app)


def main() -> int:
    _register_optional()
    try:
        app(standalone_mode=True)
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
