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
