"""The watchdog agent's side in Sentinel: how the engine's processes get it.

``sentinel/agent/site/sitecustomize.py`` is the agent itself (standard library only,
it runs inside the engine). ``inject`` prepends its directory to the engine's
``PYTHONPATH`` (keeping any existing value) and passes the socket and GC settings
in ``SENTINEL_AGENT_*`` variables, added after ``build_env`` filtered Sentinel's own.
"""

from __future__ import annotations

import os
from pathlib import Path

from sentinel.config.schema import AgentConfig

SITE_DIR = Path(__file__).resolve().parent / "site"
SOCKET_VAR = "SENTINEL_AGENT_SOCKET"


def inject(env: dict[str, str], cfg: AgentConfig, socket_path: str) -> None:
    """Make every Python process started with ``env`` load the agent."""
    if not cfg.enabled:
        return
    existing = env.get("PYTHONPATH")
    parts = [str(SITE_DIR)] + ([existing] if existing else [])
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env[SOCKET_VAR] = socket_path
    env["SENTINEL_AGENT_INTERVAL"] = f"{cfg.report_interval_s:g}"
    env["SENTINEL_AGENT_TRACKED_EVERY_S"] = f"{cfg.tracked_objects_interval_s:g}"
    if cfg.gc_thresholds:
        env["SENTINEL_AGENT_GC_THRESHOLDS"] = ",".join(str(n) for n in cfg.gc_thresholds)
    if cfg.gc_freeze_after_s is not None:
        env["SENTINEL_AGENT_GC_FREEZE_AFTER_S"] = f"{cfg.gc_freeze_after_s:g}"
    env.pop("SENTINEL_AGENT_ROOT_PID", None)  # the engine's first process sets it
