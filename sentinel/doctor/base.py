"""What a check returns, and the host facts checks read (each injectable)."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

GIB = 1024**3
MIB = 1024**2


class Status(StrEnum):
    ok = "pass"
    warn = "warn"
    fail = "fail"
    skip = "skip"


@dataclass(frozen=True)
class Result:
    name: str
    status: Status
    summary: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"check": self.name, "status": self.status.value, "summary": self.summary,
                "fix": self.fix}  # fmt: skip


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    memory_total: int
    processes: tuple[tuple[int, int], ...] = ()  # (pid, used GPU memory bytes)


@dataclass(frozen=True)
class GpuFacts:
    available: bool
    reason: str = ""
    driver: str | None = None
    cuda_driver: str | None = None  # the newest CUDA the driver supports, "12.8"
    gpus: tuple[GpuInfo, ...] = ()


@dataclass(frozen=True)
class VllmFacts:
    importable: bool
    version: str | None = None
    error: str = ""


def read_gpu_facts() -> GpuFacts:
    """Every GPU through NVML; ``available=False`` with the reason otherwise."""
    from sentinel.collectors.gpu.nvml import NvmlUnavailable, load_nvml

    try:
        session = load_nvml()  # the one importer of pynvml
    except NvmlUnavailable as exc:  # no nvidia-ml-py, no library or no driver
        return GpuFacts(False, str(exc))
    nv = session.lib
    try:
        driver = str(nv.nvmlSystemGetDriverVersion())
        cuda = None
        try:
            v = int(nv.nvmlSystemGetCudaDriverVersion_v2())
            cuda = f"{v // 1000}.{v % 1000 // 10}"
        except Exception:  # noqa: BLE001 (an old driver: leave it unknown)
            cuda = None
        gpus = []
        for i in range(nv.nvmlDeviceGetCount()):
            h = nv.nvmlDeviceGetHandleByIndex(i)
            name = nv.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else str(name)
            total = int(nv.nvmlDeviceGetMemoryInfo(h).total)
            try:
                procs = tuple(
                    (int(p.pid), int(p.usedGpuMemory or 0))
                    for p in nv.nvmlDeviceGetComputeRunningProcesses(h)
                )
            except Exception:  # noqa: BLE001
                procs = ()
            gpus.append(GpuInfo(i, name, total, procs))
        return GpuFacts(True, "", driver, cuda, tuple(gpus))
    except Exception as exc:  # noqa: BLE001
        return GpuFacts(False, f"NVML failed: {exc}")
    finally:
        session.close()


def read_vllm(python: str, timeout_s: float = 180.0) -> VllmFacts:
    """Import vLLM in the engine's interpreter (a subprocess: the import is heavy)."""
    code = "import vllm, sys; sys.stdout.write(vllm.__version__)"
    try:
        r = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return VllmFacts(False, error=str(exc))
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return VllmFacts(False, error=last)
    return VllmFacts(True, r.stdout.strip() or None)


def torch_cuda_version() -> tuple[bool, str | None]:
    """(torch installed, the CUDA it was built for or None for a CPU build), read from
    torch/version.py without importing torch."""
    import importlib.util

    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return False, None
    path = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    try:
        text = path.read_text()
    except OSError:
        return True, None
    for line in text.splitlines():
        if line.startswith("cuda"):
            value = line.split("=", 1)[1].strip().strip("'\"")
            return True, (None if value in ("", "None") else value)
    return True, None


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except OSError:
        return os.cpu_count() or 1


@dataclass
class Host:
    """Every reading the checks make; the defaults read this machine."""

    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    proc: Path = Path("/proc")
    cgroup: Path = Path("/sys/fs/cgroup")
    shm: Path = Path("/dev/shm")
    statvfs: Callable[[str], os.statvfs_result] = os.statvfs
    nofile: Callable[[], tuple[int, int]] = lambda: resource.getrlimit(resource.RLIMIT_NOFILE)
    cpus: Callable[[], int] = _usable_cpus
    gpu: Callable[[], GpuFacts] = read_gpu_facts
    vllm: Callable[[str], VllmFacts] = read_vllm
    torch_cuda: Callable[[], tuple[bool, str | None]] = torch_cuda_version
    which: Callable[[str], str | None] = shutil.which
    python: str = sys.executable
    _gpu: GpuFacts | None = None

    def gpus(self) -> GpuFacts:
        if self._gpu is None:
            self._gpu = self.gpu()
        return self._gpu

    def read(self, path: Path) -> str | None:
        try:
            return path.read_text()
        except OSError:
            return None
