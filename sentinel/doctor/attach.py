"""`sentinel doctor` in attach mode (issue 18): the engine Sentinel guards but did not launch."""

from __future__ import annotations

import httpx

from sentinel.config.schema import SentinelConfig
from sentinel.doctor.base import Host, Result, Status
from sentinel.engine.discovery import discover

# checks of what Sentinel would launch: the engine container's business in attach mode
LAUNCH_ONLY = frozenset(
    {"vllm", "model", "model_fits_gpu", "pytorch_alloc_conf", "stray_gpu_processes", "pid1"}
)


def skipped_for_attach(name: str) -> Result:
    return Result(name, Status.skip, "engine.mode: attach: the engine container's own concern")


def _health(url: str) -> str:
    try:
        code = httpx.get(url + "/health", timeout=3.0, trust_env=False).status_code
    except httpx.HTTPError as exc:
        return f"{url}/health does not answer ({type(exc).__name__})"
    return f"{url}/health answers {code}"


def check_attach(cfg: SentinelConfig, host: Host) -> Result:
    name = "attach"
    eng = cfg.engine
    if eng.mode != "attach":
        return Result(name, Status.skip, "engine.mode: launch (Sentinel starts the engine)")
    found = discover(eng.attach, eng.attach_port(), eng.attach_host())
    health = _health(eng.attach_url())
    if found.problem and found.members:  # taken, but not seen serving the URL's port
        return Result(name, Status.fail, f"mode attach; {found.problem}; {health}",
                      "check that engine.attach.base_url's port is the engine's --port, and "
                      "give Sentinel the engine's uid or SYS_PTRACE (its sockets are read "
                      "to tell the engine from look-alikes)")  # fmt: skip
    if found.problem:
        return Result(name, Status.fail, f"mode attach; {found.problem}; {health}",
                      "set engine.attach.pid_file, or an api_server_match that only the "
                      "engine's API server has")  # fmt: skip
    if not found.members:
        return Result(name, Status.warn, f"mode attach; no engine process found; {health}",
                      "share the pod's process namespace (shareProcessNamespace: true) for "
                      "dumps, per-process telemetry and recovery; probes work without")  # fmt: skip
    pids = ", ".join(f"{m.role} {m.pid}" for m in found.members)
    return Result(name, Status.ok, f"mode attach; pids: {pids}; {health}")
