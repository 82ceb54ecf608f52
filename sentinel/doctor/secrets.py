"""The key sources the config names (``engine.api_key_env``, each tier's ``api_key_env`` /
``api_key_file``, ``proxy.auth.keys_file`` / ``keys_env``, the ``ops.admin`` token) are read
the way ``sentinel run`` reads them at start-up, so a missing variable, an empty or
unreadable file, a key that cannot go into a header or anonymous access to a paid tier is
found before the engine is started. Results name the source, never a value."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from sentinel.config.schema import SentinelConfig
from sentinel.doctor.base import Host, Result, Status
from sentinel.engine.apikey import load_engine_key
from sentinel.ops.admin import AdminTokenError, read_token
from sentinel.proxy.auth import Authenticator
from sentinel.proxy.secrets import SecretError, load_api_key


def check_secrets(cfg: SentinelConfig, host: Host) -> Result:
    name = "secrets"
    env = host.environ
    found: list[str] = []
    problems: list[str] = []
    try:
        if load_engine_key(cfg.engine, env) is not None:
            found.append(f"engine.api_key_env ({cfg.engine.api_key_env})")
    except SecretError as exc:
        problems.append(str(exc))
    if cfg.proxy.enabled:
        for tier in cfg.proxy.tiers:
            try:
                if load_api_key(tier.name, tier.api_key_env, tier.api_key_file, env) is not None:
                    found.append(f"tier {tier.name}")
            except SecretError as exc:
                problems.append(str(exc))
        auth = Authenticator(cfg.proxy.auth, cfg.proxy.tiers, CollectorRegistry())
        try:
            auth.load(env)
            if auth.enabled:
                found.append("client keys")
        except SecretError as exc:
            problems.append(str(exc))
    admin = cfg.ops.admin
    try:
        if read_token(admin.token_file, admin.token_env, env) is not None:
            found.append("admin token")
    except AdminTokenError as exc:
        problems.append(str(exc))
    if problems:
        return Result(
            name,
            Status.fail,
            "; ".join(problems),
            "set the variable in the container's environment (Kubernetes: env from a "
            "Secret) or fix the file; `sentinel run` refuses to start without it",
        )
    if not found:
        return Result(name, Status.ok, "no API key sources configured")
    return Result(name, Status.ok, "keys readable: " + ", ".join(found))
