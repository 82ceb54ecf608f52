"""Readiness: every check that must hold for the engine to take traffic, named.

Ready only when all hold:
- ``lifecycle``: the engine generation is running (not starting, restarting,
  draining, failed or stopped);
- ``loaded``: its first real inference succeeded;
- ``inference_probe``: the latest inference probe succeeded, within ``freshness_s``;
- ``progress``: tokens are flowing (not ``stalled``).
"""

from __future__ import annotations

from typing import Any

from sentinel.config.schema import ProbesConfig
from sentinel.probes.inference import PROBE_NAME
from sentinel.state import EngineStatus, Lifecycle

Checks = dict[str, dict[str, Any]]


def _check(ok: bool, detail: str) -> dict[str, Any]:
    return {"ok": ok, "detail": detail}


def evaluate_readiness(
    status: EngineStatus, cfg: ProbesConfig, now: float, probe_sent_at: float | None = None
) -> tuple[bool, Checks]:
    """``probe_sent_at``: when the inference probe now in flight went out (None: none is).
    A success goes stale only once no probe sent while it was fresh is still waiting for
    its answer: that probe's verdict (answer, busy or timeout, bounded by timeout_s) decides,
    so a probe queued behind a burst does not flip readiness before its own deadline."""
    checks: Checks = {}
    lc = status.lifecycle
    if lc == Lifecycle.running:
        checks["lifecycle"] = _check(True, "running")
    else:
        why = (
            f": {status.failure_reason}" if lc == Lifecycle.failed and status.failure_reason else ""
        )
        checks["lifecycle"] = _check(False, f"engine is {lc.value}{why}")

    if status.loaded_at is not None:
        checks["loaded"] = _check(True, f"generation {status.generation} loaded")
    else:
        checks["loaded"] = _check(False, f"generation {status.generation} has not loaded yet")

    probe = status.probes.get(PROBE_NAME)
    if probe is None:
        checks["inference_probe"] = _check(False, "no inference probe result yet")
    else:
        age = max(0.0, now - probe.at)
        if not probe.ok:
            checks["inference_probe"] = _check(
                False, f"last probe failed {age:.1f}s ago: {probe.detail}"
            )
        elif age > cfg.freshness_s and (
            probe_sent_at is None or probe_sent_at - probe.at > cfg.freshness_s
        ):
            checks["inference_probe"] = _check(
                False, f"last success {age:.1f}s ago, older than freshness_s={cfg.freshness_s:g}"
            )
        elif age > cfg.freshness_s:
            checks["inference_probe"] = _check(
                True,
                f"last success {age:.1f}s ago; the next probe is waiting for its answer "
                f"(sent {max(0.0, now - probe_sent_at):.1f}s ago, timeout_s={cfg.timeout_s:g})",
            )
        elif probe.detail:  # passed without an answer: the engine was busy (runner)
            checks["inference_probe"] = _check(True, f"{probe.detail} ({age:.1f}s ago)")
        else:
            latency = f" in {probe.latency_s * 1000:.0f} ms" if probe.latency_s is not None else ""
            checks["inference_probe"] = _check(True, f"succeeded {age:.1f}s ago{latency}")

    if status.stalled_reason:
        checks["progress"] = _check(False, f"stalled: {status.stalled_reason}")
    else:
        checks["progress"] = _check(True, "tokens flowing or idle")

    return all(c["ok"] for c in checks.values()), checks


def pod_readiness(
    engine_ready: bool, checks: Checks, proxy: tuple[bool, str], mode: str
) -> tuple[bool, Checks]:
    """/readyz with the proxy's word added as the ``proxy`` check. ``local_engine``: the
    engine's checks and the proxy must hold; ``any_tier``: the proxy's alone (this pod
    can serve through some tier), the engine's checks shown for information."""
    checks = {**checks, "proxy": _check(proxy[0], proxy[1])}
    if mode == "any_tier":
        return proxy[0], checks
    return engine_ready and proxy[0], checks
