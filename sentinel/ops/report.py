"""The /status document: ``EngineStatus.snapshot()`` plus Sentinel and config context.

Nothing secret goes in: engine environment values are left out (names only),
engine arguments that follow a secret-looking flag are redacted, and every
string from the engine's log passes ``redact_text``.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

from sentinel import __version__
from sentinel.config import SentinelConfig
from sentinel.logs import REDACTED, redact_text
from sentinel.state import EngineStatus

_SECRET_FLAG = re.compile(r"(key|token|secret|password|credential)", re.I)

# engine values worth showing a person (summed over label sets)
ENGINE_VALUES = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:generation_tokens_total",
    "vllm:prompt_tokens_total",
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",
    "vllm:num_preemptions_total",
)


def redact_argv(argv: Sequence[str]) -> list[str]:
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        if arg.startswith("--") and _SECRET_FLAG.search(arg):
            if "=" in arg:
                out.append(arg.split("=", 1)[0] + "=" + REDACTED)
            else:
                out.append(arg)
                hide_next = True
            continue
        out.append(redact_text(arg))
    return out


def config_summary(cfg: SentinelConfig, engine_base_url: str | None) -> dict[str, Any]:
    eng = cfg.engine
    return {
        "engine": {
            "mode": eng.mode.value,  # issue 18: launch | attach
            "model": redact_text(eng.model),
            "served_model_name": eng.served_model_name,
            "base_url": engine_base_url,
            "args": redact_argv(eng.args),
            "command": redact_argv(eng.command),
            "env_names": sorted(eng.env),
            "gpu_indices": list(eng.gpu_indices),
        },
        "probes": cfg.probes.model_dump(mode="json", exclude={"prompt"}),
        "ops": cfg.ops.model_dump(mode="json"),
        "lifecycle": {"drain_timeout_s": cfg.lifecycle.drain_timeout_s},  # `sentinel drain`
        "supervisor": {
            "startup_timeout_s": cfg.supervisor.startup_timeout_s,
            "stop_grace_s": cfg.supervisor.stop_grace_s,
            "on_failed": cfg.supervisor.on_failed.value,
            "crash_loop_max_starts": cfg.supervisor.crash_loop_max_starts,
            "crash_loop_window_s": cfg.supervisor.crash_loop_window_s,
        },
    }


def finite(obj: Any) -> Any:
    """JSON has no NaN/Infinity: such floats become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


class StatusReport:
    def __init__(
        self,
        status: EngineStatus,
        cfg: SentinelConfig,
        *,
        engine_base_url: Callable[[], str] | None = None,
        log_tail: Callable[[], Sequence[str]] | None = None,
        extras: Callable[[], dict[str, Any]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._status = status
        self._cfg = cfg
        self._base_url = engine_base_url
        self._log_tail = log_tail
        self._extras = extras
        self._clock = clock
        self._started_at = clock()
        # more top-level sections of /status, by name (e.g. "watchdogs", issue 17)
        self.sections: dict[str, Callable[[], Any]] = {}

    def build(self, log_lines: int = 0, *, authenticated: bool = False) -> dict[str, Any]:
        """The /status document; engine log lines (``log_tail`` and ``last_exit.log_tail``)
        only for an ``authenticated`` caller (the admin token): the open /status says how
        many lines it holds back instead."""
        st = self._status
        now = self._clock()
        doc = st.snapshot()
        last_exit = doc.get("last_exit")
        if isinstance(last_exit, dict) and "log_tail" in last_exit:
            tail = list(last_exit.pop("log_tail") or [])
            if authenticated:
                last_exit["log_tail"] = [redact_text(line) for line in tail]
            elif tail:
                last_exit["log_tail_hidden"] = (
                    f"{len(tail)} engine log lines, admin-only: send the admin token "
                    "(sentinel status --json --log-tail N)"
                )
        doc["now"] = now
        doc["engine_metrics"] = {
            k: st.engine_metrics[k] for k in ENGINE_VALUES if k in st.engine_metrics
        }
        doc["engine_metrics_age_s"] = (
            round(now - st.engine_metrics_at, 3) if st.engine_metrics_at is not None else None
        )
        doc["sentinel"] = {
            "version": __version__,
            "pid": os.getpid(),
            "started_at": self._started_at,
            "uptime_s": round(now - self._started_at, 1),
            **(self._extras() if self._extras else {}),
        }
        base_url = self._base_url() if self._base_url else None
        doc["config"] = config_summary(self._cfg, base_url)
        for name, section in self.sections.items():
            doc[name] = section()
        if log_lines > 0 and self._log_tail is not None:
            doc["log_tail"] = [redact_text(line) for line in list(self._log_tail())[-log_lines:]]
        return finite(doc)
