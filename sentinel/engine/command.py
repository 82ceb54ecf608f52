"""Build the engine's argv and environment from ``EngineConfig``."""

from __future__ import annotations

import os
import sys
from collections.abc import Collection, Iterator, Mapping
from typing import Any

from sentinel.config.schema import EngineConfig, SentinelConfig

VLLM_ENTRYPOINT = "vllm.entrypoints.openai.api_server"


def build_argv(cfg: EngineConfig) -> list[str]:
    """The engine command: ``engine.command`` verbatim when set, else vLLM's OpenAI server."""
    if cfg.command:
        return list(cfg.command)
    argv = [
        cfg.python or sys.executable,
        "-m",
        VLLM_ENTRYPOINT,
        "--model",
        cfg.model,
        "--host",
        cfg.host,
        "--port",
        str(cfg.port),
    ]
    if cfg.served_model_name:
        argv += ["--served-model-name", cfg.served_model_name]
    return argv + list(cfg.args)


def wants_shutdown_timeout(cfg: EngineConfig) -> bool:
    """Add vLLM's --shutdown-timeout: a managed command, not already given, and the vLLM
    of Sentinel's interpreter has the flag (read from its source: no import)."""
    if cfg.command or (cfg.python and cfg.python != sys.executable):
        return False
    if any(a == "--shutdown-timeout" or a.startswith("--shutdown-timeout=") for a in cfg.args):
        return False
    return vllm_has_flag("--shutdown-timeout")


def vllm_has_flag(flag: str) -> bool:
    import importlib.util
    from pathlib import Path

    try:
        spec = importlib.util.find_spec("vllm")
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.submodule_search_locations:
        return False
    for root in spec.submodule_search_locations:
        try:
            if flag in (Path(root) / "engine" / "arg_utils.py").read_text(errors="replace"):
                return True
        except OSError:
            continue
    return False


def inherited(name: str, patterns: Collection[str]) -> bool:
    """True when ``name`` is one of ``patterns`` (exact names, or prefixes ending in ``*``)."""
    for pat in patterns:
        if pat.endswith("*"):
            if name.startswith(pat[:-1]):
                return True
        elif name == pat:
            return True
    return False


def build_env(
    cfg: EngineConfig,
    base: Mapping[str, str] | None = None,
    withhold: Collection[str] = (),
) -> dict[str, str]:
    """The engine's environment: the variables of Sentinel's that ``engine.inherit_env``
    names, plus ``engine.env``. ``SENTINEL_*`` and every name in ``withhold`` (secrets
    such as a tier's API key variable) never reach the engine, whatever names them."""
    source = os.environ if base is None else base
    blocked = set(withhold)
    env = {
        name: value
        for name, value in source.items()
        if inherited(name, cfg.inherit_env)
        and not name.startswith("SENTINEL_")
        and name not in blocked
    }
    # vLLM logs through Python logging; unbuffered output keeps lines in order
    # and none are lost in a buffer when the process is killed
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update((k, v) for k, v in cfg.env.items() if k not in blocked)
    return env


def _env_name_settings(node: Any, key: str = "") -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _env_name_settings(v, str(k))
    elif isinstance(node, list):
        for item in node:
            yield from _env_name_settings(item, key)
    elif isinstance(node, str) and key.endswith("_env") and node:
        yield node


def secret_env_names(cfg: SentinelConfig) -> set[str]:
    """Names of the environment variables the config reads secrets from: every setting
    named ``*_env`` holding a variable's name (a tier's ``api_key_env``, the proxy's
    client-key variable, an admin token's...), outside the ``engine`` section."""
    dumped = cfg.model_dump(mode="json")
    dumped.pop("engine", None)
    return set(_env_name_settings(dumped))


def uses_managed_port(cfg: EngineConfig) -> bool:
    """True when Sentinel chose the engine's host/port (not a verbatim command)."""
    return not cfg.command


_SECRET_FLAG = ("key", "token", "secret", "password")


def redacted_argv(argv: list[str]) -> list[str]:
    """argv for logs: the value after a --*key/--*token/... flag is hidden."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append("[REDACTED]")
            hide_next = False
            continue
        flag = arg.lower()
        if flag.startswith("--") and any(s in flag for s in _SECRET_FLAG):
            if "=" in arg:
                out.append(arg.split("=", 1)[0] + "=[REDACTED]")
                continue
            hide_next = True
        out.append(arg)
    return out
