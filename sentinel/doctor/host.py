"""Checks of the host: /dev/shm, open files, ptrace, disk, CPUs, cgroup memory, PID 1,
ports."""

from __future__ import annotations

import os
from pathlib import Path

from sentinel.config.schema import SentinelConfig
from sentinel.doctor.base import GIB, MIB, Host, Result, Status
from sentinel.engine import diagnose

SHM_FAIL = 256 * MIB
SHM_WARN = 1 * GIB
NOFILE_GOOD = 65536
NOFILE_FAIL = 4096
CAP_SYS_PTRACE = 19


def _size(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / MIB:.0f} MiB"


def check_shm(cfg: SentinelConfig, host: Host) -> Result:
    name = "shm"
    fix = "give the container more: docker run --shm-size=16g; Kubernetes: an emptyDir "
    fix += "with medium: Memory mounted at /dev/shm"
    try:
        st = host.statvfs(str(host.shm))
    except OSError as exc:
        return Result(name, Status.fail, f"{host.shm} cannot be read: {exc.strerror}", fix)
    size = st.f_blocks * st.f_frsize
    if size < SHM_FAIL:
        return Result(
            name,
            Status.fail,
            f"{host.shm} is {_size(size)}: far too small for "
            "vLLM's shared-memory queues and NCCL (Docker's default is 64 MiB)",
            fix,
        )
    if size < SHM_WARN:
        return Result(
            name,
            Status.warn,
            f"{host.shm} is {_size(size)}: small for tensor-parallel engines",
            fix,
        )
    return Result(name, Status.ok, f"{host.shm} is {_size(size)}")  # fmt: skip


def check_open_files(cfg: SentinelConfig, host: Host) -> Result:
    name = "open_files"
    soft, hard = host.nofile()
    unlimited = -1
    fix = f"raise it: ulimit -n {NOFILE_GOOD * 16}; docker run --ulimit nofile=1048576:1048576;"
    fix += " systemd LimitNOFILE="
    if soft == unlimited or soft >= NOFILE_GOOD:
        return Result(name, Status.ok, f"open-file limit {soft} (hard {hard})")
    if hard == unlimited or hard >= NOFILE_GOOD:
        return Result(name, Status.ok, f"open-file limit {soft}, hard {hard}: vLLM raises "
                      "its own soft limit up to the hard one")  # fmt: skip
    status = Status.fail if hard < NOFILE_FAIL else Status.warn
    return Result(name, status, f"open-file limit {soft} (hard {hard}): under load vLLM "
                  "and the proxy run out of sockets ('Too many open files')", fix)  # fmt: skip


def _cap_eff(host: Host) -> int | None:
    text = host.read(host.proc / "self" / "status")
    for line in (text or "").splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return None


def check_ptrace(cfg: SentinelConfig, host: Host) -> Result:
    """py-spy (stack dumps of the engine) needs to ptrace a process that is not its child."""
    name = "ptrace"
    fix = "add the capability: docker run --cap-add SYS_PTRACE; Kubernetes: "
    fix += "securityContext.capabilities.add: [SYS_PTRACE]"
    scope_text = host.read(host.proc / "sys" / "kernel" / "yama" / "ptrace_scope")
    scope = int(scope_text.strip()) if scope_text and scope_text.strip().isdigit() else 0
    caps = _cap_eff(host)
    has_cap = caps is not None and bool(caps >> CAP_SYS_PTRACE & 1)
    spy = host.which("py-spy")
    tail = "" if spy else "; py-spy is not installed (pip install py-spy)"
    if scope >= 3:
        return Result(
            name,
            Status.fail,
            "kernel.yama.ptrace_scope is 3: no process may "
            "ptrace, so no stack dumps of a hung engine" + tail,
            "set kernel.yama.ptrace_scope to 1 or lower (needs a reboot from 3)",
        )
    if scope >= 1 and not has_cap:
        return Result(
            name,
            Status.warn,
            f"kernel.yama.ptrace_scope is {scope} and "
            "CAP_SYS_PTRACE is missing: py-spy cannot dump the engine's stacks" + tail,
            fix + "; or sysctl kernel.yama.ptrace_scope=0",
        )
    why = "CAP_SYS_PTRACE" if has_cap else f"ptrace_scope {scope}"
    status = Status.ok if spy else Status.warn
    return Result(name, status, f"ptrace permitted ({why}){tail}",
                  "" if spy else "pip install py-spy")  # fmt: skip


def _dirs(cfg: SentinelConfig) -> list[tuple[str, Path]]:
    """Directories Sentinel writes to: payload_log.dir and every other ``*dir`` setting."""
    out: list[tuple[str, Path]] = []

    def walk(node: object, where: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                key = f"{where}.{k}" if where else str(k)
                if isinstance(v, str) and (k == "dir" or str(k).endswith("_dir")):
                    out.append((key, Path(v)))
                else:
                    walk(v, key)

    dumped = cfg.model_dump(mode="json")
    dumped.pop("engine", None)
    if not cfg.payload_log.enabled:
        dumped.pop("payload_log", None)
    walk(dumped, "")
    return out


def _existing_parent(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_disk(cfg: SentinelConfig, host: Host) -> Result:
    name = "disk"
    dirs = _dirs(cfg)
    if not dirs:
        return Result(name, Status.skip, "no directory to write (payload log off)")
    problems, warns, notes = [], [], []
    for key, path in dirs:
        base = _existing_parent(path)
        if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
            problems.append(f"{key} {path}: not writable ({base} is not a writable directory)")
            continue
        try:
            st = host.statvfs(str(base))
        except OSError as exc:
            problems.append(f"{key} {path}: {exc.strerror}")
            continue
        free = st.f_bavail * st.f_frsize
        need = cfg.payload_log.max_total_bytes if key == "payload_log.dir" else GIB
        notes.append(f"{key} {path}: {_size(free)} free")
        if free < need:
            warns.append(f"{key} {path}: {_size(free)} free, under its budget {_size(need)}")
    if problems:
        return Result(name, Status.fail, "; ".join(problems),
                      "create the directory and make it writable for Sentinel's user, or point "
                      "the setting at one that is")  # fmt: skip
    if warns:
        return Result(
            name, Status.warn, "; ".join(warns), "free space, or lower payload_log.max_total_bytes"
        )
    return Result(name, Status.ok, "; ".join(notes))


def check_cpus(cfg: SentinelConfig, host: Host) -> Result:
    name = "cpus"
    cpus = host.cpus()
    gpus = host.gpus()
    n_gpu = len(cfg.engine.gpu_indices) or len(gpus.gpus)
    if gpus.available and n_gpu:
        per = cpus / n_gpu
        if per < 2:
            return Result(name, Status.fail, f"{cpus} CPUs for {n_gpu} GPUs ({per:.1f} each): "
                          "the engine's scheduler and tokenizers starve the GPUs",
                          "give the container at least 4 CPUs per GPU")  # fmt: skip
        if per < 4:
            return Result(
                name,
                Status.warn,
                f"{cpus} CPUs for {n_gpu} GPUs ({per:.1f} each)",
                "give the container at least 4 CPUs per GPU",
            )
        return Result(name, Status.ok, f"{cpus} CPUs for {n_gpu} GPUs ({per:.1f} each)")
    if cpus < 2:
        return Result(
            name,
            Status.warn,
            f"{cpus} CPU: Sentinel and the engine share it",
            "give the container at least 2 CPUs",
        )
    return Result(name, Status.ok, f"{cpus} CPUs (no GPU)")


def cgroup_memory_limit(host: Host) -> int | None:
    """The cgroup memory limit in bytes, or None (no limit, or none readable)."""
    for path in (host.cgroup / "memory.max", host.cgroup / "memory" / "memory.limit_in_bytes"):
        text = host.read(path)
        if text is None:
            continue
        text = text.strip()
        if text == "max" or not text.isdigit():
            return None
        value = int(text)
        return None if value >= 1 << 60 else value  # cgroup v1's "unlimited"
    return None


def check_pid1(cfg: SentinelConfig, host: Host) -> Result:
    name = "pid1"
    comm = (host.read(host.proc / "1" / "comm") or "").strip()
    cmdline = (host.read(host.proc / "1" / "cmdline") or "").replace("\0", " ").strip()
    known = ("tini", "dumb-init", "systemd", "init", "catatonit", "s6-svscan", "runit")
    if comm in known or "tini" in cmdline or "sentinel" in cmdline:
        return Result(name, Status.ok, f"PID 1 is {comm or '?'} ({cmdline[:60]}): signals reach "
                      "Sentinel and orphans are reaped")  # fmt: skip
    if comm in ("sh", "bash", "dash", "ash", "zsh"):
        return Result(name, Status.warn, f"PID 1 is a shell ({cmdline[:60]}): it does not "
                      "forward SIGTERM, so Sentinel never drains and is killed after the grace",
                      "exec Sentinel from the script (exec sentinel run ...) or run it under "
                      "tini: ENTRYPOINT [\"tini\", \"--\", \"sentinel\"]")  # fmt: skip
    return Result(name, Status.ok, f"PID 1 is {comm or '?'}: run Sentinel as PID 1 or under "
                  "tini in a container")  # fmt: skip


def check_ports(cfg: SentinelConfig, host: Host) -> Result:
    name = "ports"
    wanted = []
    if not cfg.engine.command and cfg.engine.mode == "launch":  # attach: the engine holds it
        wanted.append(("engine.port", cfg.engine.host, cfg.engine.port))
    wanted.append(("ops.port", cfg.ops.host, cfg.ops.port))
    if cfg.proxy.enabled:
        wanted.append(("proxy.port", cfg.proxy.host, cfg.proxy.port))
    seen: dict[int, str] = {}
    busy, dup = [], []
    for key, h, port in wanted:
        if not port:
            continue
        if port in seen:
            dup.append(f"{key} and {seen[port]} are both {port}")
        seen[port] = key
        if diagnose.port_in_use(h, port):
            busy.append(f"{key} {port} on {h} is in use{diagnose.holder_hint(port)}")
    if dup or busy:
        return Result(name, Status.fail, "; ".join(dup + busy),
                      "stop whatever holds the port (a leftover engine: see the pid) or choose "
                      "another port in the config")  # fmt: skip
    ports = ", ".join(f"{k} {p}" for k, _, p in wanted)
    return Result(name, Status.ok, f"free: {ports}")
