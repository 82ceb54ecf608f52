"""Tier API keys: read from an environment variable or a file, never logged.

The key is held in a ``Secret`` whose ``repr``/``str`` never show it, so a key that
ends up in a log call or a status dump prints as ``Secret(****)``.
"""

from __future__ import annotations

import os
from pathlib import Path


class SecretError(ValueError):
    """A configured key source is missing or empty (names the source, never the value)."""


class Secret:
    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(****)"

    __str__ = __repr__


def load_api_key(tier: str, env: str | None, file: Path | None) -> Secret | None:
    """The tier's key, env var first, then file; None when the tier has no key configured."""
    if env:
        value = os.environ.get(env, "").strip()
        if value:
            return Secret(value)
        if not file:
            raise SecretError(f"tier {tier!r}: environment variable {env} is not set or empty")
    if file:
        try:
            value = Path(file).read_text().strip()
        except OSError as exc:
            raise SecretError(
                f"tier {tier!r}: cannot read api_key_file {file}: {exc.strerror}"
            ) from None
        if not value:
            raise SecretError(f"tier {tier!r}: api_key_file {file} is empty")
        return Secret(value)
    return None
