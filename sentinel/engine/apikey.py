"""The engine's own API key (vLLM ``--api-key`` / ``VLLM_API_KEY``): vLLM then answers
401 on ``/v1/*`` without ``Authorization: Bearer KEY`` (``/health`` and ``/metrics`` stay
open). Sentinel's inference probe and the proxy's local tier must send it.

``engine.api_key_env`` names the variable of Sentinel's environment holding the key. In
launch mode Sentinel hands it to vLLM as ``VLLM_API_KEY`` in the engine's environment, not
as ``--api-key`` (argv is readable by anyone with ``ps``). The value is held in a
``Secret``: never logged, never in ``/status``, incident bundles or other tiers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

from sentinel.config.schema import EngineConfig
from sentinel.proxy.secrets import Secret, SecretError, check_header_value

ENGINE_KEY_VAR = "VLLM_API_KEY"  # what vLLM reads when --api-key is not given


def load_engine_key(cfg: EngineConfig, environ: Mapping[str, str] | None = None) -> Secret | None:
    """The key from ``engine.api_key_env``; None when unset. Raises ``SecretError`` naming
    the variable (never the value) when it is set but empty or unusable in a header."""
    if not cfg.api_key_env:
        return None
    env = os.environ if environ is None else environ
    value = env.get(cfg.api_key_env, "").strip()
    if not value:
        raise SecretError(
            f"engine.api_key_env: environment variable {cfg.api_key_env} is not set or empty"
        )
    check_header_value(value, f"engine.api_key_env: environment variable {cfg.api_key_env}")
    return Secret(value)


def key_env_extender(key: Secret) -> Callable[[dict[str, str]], None]:
    """Adds the key to the engine's environment as ``VLLM_API_KEY`` (launch mode)."""

    def extend(env: dict[str, str]) -> None:
        env[ENGINE_KEY_VAR] = key.reveal()

    return extend
