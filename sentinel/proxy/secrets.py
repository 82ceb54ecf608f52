"""Tier API keys: read from an environment variable or a file, never logged.

The key is held in a ``Secret`` whose ``repr``/``str`` never show it, so a key that
ends up in a log call or a status dump prints as ``Secret(****)``. Every value that
becomes a header (tier keys here, client keys in ``auth``) is checked at start-up:
a CR, LF or other control character would split or corrupt the header it goes into.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


class SecretError(ValueError):
    """A configured key source is missing or empty (names the source, never the value)."""


class Secret:
    __slots__ = ("_value", "_bearer")

    def __init__(self, value: str) -> None:
        self._value = value
        self._bearer: bytes | None = None

    def reveal(self) -> str:
        return self._value

    def bearer(self) -> bytes:
        """The ``Authorization`` header value that sends it (``Bearer <key>``)."""
        if self._bearer is None:
            self._bearer = b"Bearer " + self._value.encode("latin-1")
        return self._bearer

    def __repr__(self) -> str:
        return "Secret(****)"

    __str__ = __repr__


def check_header_value(value: str, where: str) -> None:
    """Raise ``SecretError`` (naming ``where``, never the value) when ``value`` cannot
    go into an HTTP header: a CR, LF, NUL or other control character, or non-ASCII."""
    for i, ch in enumerate(value):
        if ch in "\r\n":
            raise SecretError(f"{where}: the value holds a line break (CR/LF) at offset {i}")
        if ord(ch) < 0x20 and ch != "\t" or ord(ch) == 0x7F or ord(ch) > 0x7E:
            raise SecretError(
                f"{where}: the value holds a control or non-ASCII character at offset {i}"
            )


def load_api_key(
    tier: str, env: str | None, file: Path | None, environ: Mapping[str, str] | None = None
) -> Secret | None:
    """The tier's key, env var first, then file; None when the tier has no key configured.
    ``environ``: where the variable is read (default: this process's environment)."""
    if env:
        value = (os.environ if environ is None else environ).get(env, "").strip()
        if value:
            check_header_value(value, f"tier {tier!r}: environment variable {env}")
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
        check_header_value(value, f"tier {tier!r}: api_key_file {file}")
        return Secret(value)
    return None
