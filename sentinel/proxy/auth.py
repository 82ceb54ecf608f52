"""Client authentication on the traffic port: API keys for clients.

Keys come from a file (``proxy.auth.keys_file``) and/or an environment variable
(``proxy.auth.keys_env``), one ``<id>:<key>`` entry per line (the variable may also
separate entries with commas). Only each key's SHA-256 is kept; a presented key is
hashed and compared with every stored digest by ``hmac.compare_digest``. A client
sends its key as ``Authorization: Bearer <key>`` or ``x-api-key: <key>``.

When keys are configured they are required (a request without one is let through,
as ``anonymous``, only with ``allow_anonymous: true``); a wrong key is always refused.
With no keys configured, requests are anonymous, which Sentinel refuses at start-up
when a paid tier is configured (a non-local tier with an API key), unless
``allow_anonymous: true`` says so explicitly: nobody spends the external key
unannounced. A refused request gets a 401 OpenAI-style error and reaches no upstream.

``check`` returns the key's id (never the key): it goes into the payload record and
into ``sentinel_proxy_client_requests_total{client}``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter

from sentinel.config.schema import AuthConfig, TierConfig, TierKind
from sentinel.proxy.errors import ProxyError
from sentinel.proxy.secrets import SecretError, check_header_value
from sentinel.proxy.tally import CounterTally

ANONYMOUS = "anonymous"
MIN_KEY_LENGTH = 16
MAX_KEY_LENGTH = 1024


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def parse_keys(text: str, source: str, allow_commas: bool = False) -> dict[str, bytes]:
    """``{id: sha256(key)}`` from ``<id>:<key>`` entries (``#`` starts a comment line).
    Errors name the source and the entry's number, never the value."""
    entries = text.replace(",", "\n").splitlines() if allow_commas else text.splitlines()
    out: dict[str, bytes] = {}
    seen: set[bytes] = set()
    for n, raw in enumerate(entries, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key_id, sep, key = line.partition(":")
        key_id, key = key_id.strip(), key.strip()
        where = f"{source}, entry {n}"
        if not sep or not key_id or not key:
            raise SecretError(f"{where}: expected '<id>:<key>'")
        if not key_id.isascii() or not key_id.replace("-", "").replace("_", "").isalnum():
            raise SecretError(f"{where}: the id may hold letters, digits, '-' and '_' only")
        check_header_value(key, where)
        if not MIN_KEY_LENGTH <= len(key) <= MAX_KEY_LENGTH:
            raise SecretError(
                f"{where}: a key must be {MIN_KEY_LENGTH} to {MAX_KEY_LENGTH} characters"
            )
        if key_id in out:
            raise SecretError(f"{where}: the id {key_id!r} is given twice")
        digest = _digest(key.encode())
        if digest in seen:
            raise SecretError(f"{where}: the same key is given twice")
        seen.add(digest)
        out[key_id] = digest
    return out


def paid_tiers(tiers: list[TierConfig]) -> list[str]:
    """Tiers that spend an API key of their own (non-local tiers with a key source)."""
    return [
        t.name
        for t in tiers
        if t.kind != TierKind.local and (t.api_key_env or t.api_key_file is not None)
    ]


class Authenticator:
    def __init__(
        self, cfg: AuthConfig, tiers: list[TierConfig], registry: CollectorRegistry
    ) -> None:
        self.cfg = cfg
        self.tiers = tiers
        self._keys: list[tuple[bytes, str]] = []
        self._required = False
        self.failures = Counter(
            "sentinel_proxy_auth_failures",
            "Requests refused with 401, by reason (missing_api_key, invalid_api_key).",
            ["reason"],
            registry=registry,
        )
        self.accepted = CounterTally(
            "sentinel_proxy_client_requests",
            "Requests accepted on the traffic port, by client key id ('anonymous' without a key).",
            ["client"],
            registry=registry,
        )

    def load(self, environ: Mapping[str, str] | None = None) -> None:
        """Read the keys (at start-up; ``environ`` defaults to this process's). Raises
        ``SecretError`` naming what is wrong: an unreadable or malformed source, or
        anonymous access with a paid tier."""
        cfg = self.cfg
        keys: dict[str, bytes] = {}
        if cfg.keys_file is not None:
            try:
                text = Path(cfg.keys_file).read_text()
            except OSError as exc:
                raise SecretError(
                    f"proxy.auth.keys_file: cannot read {cfg.keys_file}: {exc.strerror}"
                ) from None
            keys.update(parse_keys(text, f"proxy.auth.keys_file {cfg.keys_file}"))
            if not keys:
                raise SecretError(f"proxy.auth.keys_file {cfg.keys_file} holds no key")
        if cfg.keys_env:
            value = (os.environ if environ is None else environ).get(cfg.keys_env, "")
            if not value.strip():
                raise SecretError(
                    f"proxy.auth.keys_env: environment variable {cfg.keys_env} is not set or empty"
                )
            from_env = parse_keys(value, f"proxy.auth.keys_env {cfg.keys_env}", True)
            twice = sorted(set(from_env) & set(keys))
            if twice:
                raise SecretError(f"proxy.auth: key ids given in both sources: {twice}")
            keys.update(from_env)
        paid = paid_tiers(self.tiers)
        if not keys and paid and not cfg.allow_anonymous:
            raise SecretError(
                f"proxy.auth: tier(s) {paid} spend an API key of their own, but no client "
                "keys are configured: set proxy.auth.keys_file or proxy.auth.keys_env, or "
                "proxy.auth.allow_anonymous: true to let anyone reach them"
            )
        self._keys = [(digest, key_id) for key_id, digest in keys.items()]
        self._required = bool(keys) and not cfg.allow_anonymous
        for key_id in (*keys, ANONYMOUS):  # exported from 0 on
            self.accepted.add((key_id,), 0)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, headers: list[tuple[bytes, bytes]]) -> str:
        """The id of the client key in ``headers`` (ASGI-style, lower-case names), or
        ``anonymous`` where that is allowed; else raises ``ProxyError(401)``."""
        presented: bytes | None = None
        for name, value in headers:
            if name == b"authorization":
                scheme, _, token = value.strip().partition(b" ")
                if scheme.lower() == b"bearer" and token.strip():
                    presented = token.strip()
                    break
            elif name == b"x-api-key" and value.strip():
                presented = value.strip()
        if presented is None or not self._keys:
            if self._required:
                self.failures.labels("missing_api_key").inc()
                raise ProxyError(
                    401,
                    "You didn't provide an API key: send it as 'Authorization: Bearer <key>' "
                    "or 'x-api-key: <key>'",
                    "missing_api_key",
                )
            self._count(ANONYMOUS)
            return ANONYMOUS
        digest = _digest(presented)
        found: str | None = None
        for stored, key_id in self._keys:  # every digest compared: no early exit
            if hmac.compare_digest(stored, digest):
                found = key_id
        if found is None:
            self.failures.labels("invalid_api_key").inc()
            raise ProxyError(401, "Incorrect API key provided", "invalid_api_key")
        self._count(found)
        return found

    def _count(self, key_id: str) -> None:
        self.accepted.add((key_id,))
