"""The checks, in the order they print, and running them."""

from __future__ import annotations

from collections.abc import Callable

from sentinel.config.schema import SentinelConfig
from sentinel.doctor import attach, engine, host, secrets
from sentinel.doctor.base import Host, Result, Status

Check = Callable[[SentinelConfig, Host], Result]

CHECKS: tuple[tuple[str, Check], ...] = (
    ("nvml", engine.check_nvml),
    ("cuda", engine.check_cuda),
    ("stray_gpu_processes", engine.check_stray_gpu_processes),
    ("pytorch_alloc_conf", engine.check_alloc_conf),
    ("vllm", engine.check_vllm),
    ("model", engine.check_model),
    ("model_fits_gpu", engine.check_model_fits_gpu),
    ("cgroup_memory", engine.check_cgroup_memory),
    ("cpus", host.check_cpus),
    ("shm", host.check_shm),
    ("open_files", host.check_open_files),
    ("ptrace", host.check_ptrace),
    ("disk", host.check_disk),
    ("ports", host.check_ports),
    ("pid1", host.check_pid1),
    ("secrets", secrets.check_secrets),
    ("attach", attach.check_attach),  # issue 18
)


def run_checks(
    cfg: SentinelConfig, facts: Host | None = None, only: set[str] | None = None
) -> list[Result]:
    """Every check (or those named in ``only``); a check that raises is a failure of its
    own, never an escaped exception."""
    facts = facts or Host()
    out = []
    for name, check in CHECKS:
        if only is not None and name not in only:
            continue
        if cfg.engine.mode == "attach" and name in attach.LAUNCH_ONLY:  # issue 18
            out.append(attach.skipped_for_attach(name))
            continue
        try:
            out.append(check(cfg, facts))
        except Exception as exc:  # noqa: BLE001 (a broken check must not hide the others)
            out.append(Result(name, Status.fail, f"the check itself failed: {exc!r}",
                              "report this as a Sentinel bug"))  # fmt: skip
    return out


def exit_status(results: list[Result]) -> int:
    return 1 if any(r.status == Status.fail for r in results) else 0
