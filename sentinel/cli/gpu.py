"""`sentinel gpu`: a table of every GPU. (Issue 4 fills this in.)"""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def gpu() -> None:
        """Show every GPU (not yet implemented)."""
        typer.echo("sentinel gpu: not implemented yet", err=True)
        raise typer.Exit(3)
