"""The `sentinel` command line (typer + rich)."""
