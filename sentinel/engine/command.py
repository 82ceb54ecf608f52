"""Build the engine's argv and environment from ``EngineConfig``."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from sentinel.config.schema import EngineConfig

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


def build_env(cfg: EngineConfig, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Sentinel's environment, minus Sentinel's own settings, plus ``engine.env``."""
    env = dict(os.environ if base is None else base)
    for name in [n for n in env if n.startswith("SENTINEL_")]:
        del env[name]
    # vLLM logs through Python logging; unbuffered output keeps lines in order
    # and none are lost in a buffer when the process is killed
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(cfg.env)
    return env


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
