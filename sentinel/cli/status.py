"""`sentinel status`: /status as a table for a person, or JSON. (Issue 3 fills this in.)"""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def status() -> None:
        """Show the engine's state (not yet implemented)."""
        typer.echo("sentinel status: not implemented yet", err=True)
        raise typer.Exit(3)
