"""Checks of what the engine needs: NVML and the driver, CUDA against torch's build,
the allocator setting, the model (present, parseable, weights, fits), cgroup memory,
stray GPU processes, vLLM importable."""

from __future__ import annotations

import json
import os
from pathlib import Path

from sentinel.config.schema import SentinelConfig
from sentinel.doctor.base import GIB, Host, Result, Status
from sentinel.doctor.host import _size, cgroup_memory_limit
from sentinel.engine.command import build_env, secret_env_names

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
DEFAULT_GPU_UTIL = 0.9  # vLLM's --gpu-memory-utilization default


def _arg(args: list[str], *flags: str) -> str | None:
    for i, a in enumerate(args):
        for f in flags:
            if a == f and i + 1 < len(args):
                return args[i + 1]
            if a.startswith(f + "="):
                return a.split("=", 1)[1]
    return None


def check_nvml(cfg: SentinelConfig, host: Host) -> Result:
    g = host.gpus()
    if not g.available:
        return Result("nvml", Status.skip, f"no GPU: {g.reason} (fine on a CPU host)",
                      "on a GPU host: install the NVIDIA driver and expose it to the container "
                      "(docker run --gpus all, the NVIDIA container runtime)")  # fmt: skip
    if not g.gpus:
        return Result(
            "nvml",
            Status.fail,
            f"driver {g.driver}: NVML sees no GPU",
            "check NVIDIA_VISIBLE_DEVICES / the device plugin's allocation",
        )
    names = ", ".join(f"{d.index}: {d.name} {_size(d.memory_total)}" for d in g.gpus)
    return Result("nvml", Status.ok, f"driver {g.driver} (CUDA {g.cuda_driver}); {names}")


def _ver(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(".")[:2] if x.isdigit())


def check_cuda(cfg: SentinelConfig, host: Host) -> Result:
    name = "cuda"
    installed, built = host.torch_cuda()
    g = host.gpus()
    if not g.available:
        what = "not installed here" if not installed else f"built for CUDA {built or '- (CPU)'}"
        return Result(name, Status.skip, f"no GPU; torch {what}")
    if not installed:
        return Result(name, Status.warn, "torch is not installed in Sentinel's environment: "
                      "cannot compare its CUDA with the driver's", "")  # fmt: skip
    if built is None:
        return Result(
            name,
            Status.fail,
            "torch is a CPU build on a GPU host",
            "install the CUDA build of torch that vLLM was built against",
        )
    if g.cuda_driver is None:
        return Result(name, Status.warn, f"torch built for CUDA {built}; the driver's CUDA "
                      "version is unknown", "")  # fmt: skip
    if _ver(built) > _ver(g.cuda_driver):
        return Result(name, Status.fail, f"torch is built for CUDA {built} but driver "
                      f"{g.driver} supports up to CUDA {g.cuda_driver}: the engine fails to "
                      "start ('driver too old')", "upgrade the NVIDIA driver, or install a "
                      f"torch/vLLM build for CUDA {g.cuda_driver} or older")  # fmt: skip
    return Result(name, Status.ok, f"torch built for CUDA {built}; driver {g.driver} supports "
                  f"CUDA {g.cuda_driver}")  # fmt: skip


def engine_environ(cfg: SentinelConfig, host: Host) -> dict[str, str]:
    return build_env(cfg.engine, base=host.environ, withhold=secret_env_names(cfg))


def check_alloc_conf(cfg: SentinelConfig, host: Host) -> Result:
    name = "pytorch_alloc_conf"
    env = engine_environ(cfg, host)
    var = next((v for v in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF") if v in env), None)
    value = env.get(var or "", "")
    fix = 'set engine.env: {PYTORCH_CUDA_ALLOC_CONF: "expandable_segments:True"}'
    if var is not None:
        items = [i.strip() for i in value.split(",") if i.strip()]
        bad = [i for i in items if ":" not in i]
        if bad:
            return Result(name, Status.fail, f"{var}={value!r}: {bad[0]!r} is not key:value; "
                          "the engine fails at its first CUDA allocation", fix)  # fmt: skip
    if not host.gpus().available:
        return Result(name, Status.skip, "no GPU" + (f"; {var}={value}" if var else ""))
    if var is None:
        return Result(
            name,
            Status.warn,
            "PYTORCH_CUDA_ALLOC_CONF is not set: long-running "
            "engines fragment GPU memory and fail allocations with memory free",
            fix,
        )
    if "expandable_segments:true" not in value.replace(" ", "").lower():
        return Result(name, Status.warn, f"{var}={value}: without expandable_segments:True "
                      "GPU memory fragments", fix)  # fmt: skip
    return Result(name, Status.ok, f"{var}={value}")


def model_weights(path: Path) -> tuple[list[Path], int]:
    files = [p for p in sorted(path.iterdir()) if p.suffix in WEIGHT_SUFFIXES and p.is_file()]
    return files, sum(p.stat().st_size for p in files)


def _model_dir(cfg: SentinelConfig) -> Path | None:
    p = Path(cfg.engine.model)
    if cfg.engine.workdir is not None and not p.is_absolute():
        p = Path(cfg.engine.workdir) / p
    return p


def check_model(cfg: SentinelConfig, host: Host) -> Result:
    name = "model"
    if cfg.engine.command:
        return Result(name, Status.skip, "engine.command is set: the model is in that command")
    path = _model_dir(cfg)
    assert path is not None
    model = cfg.engine.model
    if not path.exists():
        looks_local = model.startswith(("/", ".", "~")) or model.count("/") != 1
        offline = engine_environ(cfg, host).get("HF_HUB_OFFLINE") in ("1", "true", "True")
        if looks_local or offline:
            why = " and HF_HUB_OFFLINE is set" if offline and not looks_local else ""
            return Result(name, Status.fail, f"engine.model {model!r}: no such directory{why}",
                          "point engine.model at the model's directory (it holds config.json "
                          "and the weights)")  # fmt: skip
        return Result(
            name,
            Status.warn,
            f"engine.model {model!r} is not a local directory: "
            "vLLM downloads it from the hub at start-up",
            "download it ahead (huggingface-cli download) and point engine.model at the directory",
        )
    if not path.is_dir() or not os.access(path, os.R_OK | os.X_OK):
        return Result(
            name,
            Status.fail,
            f"engine.model {path}: not a readable directory",
            "make the model directory readable for Sentinel's user",
        )
    cfg_file = path / "config.json"
    try:
        parsed = json.loads(cfg_file.read_text())
        if not isinstance(parsed, dict):
            raise ValueError("not a JSON object")
    except OSError as exc:
        return Result(
            name,
            Status.fail,
            f"{cfg_file}: {exc.strerror}",
            "the model directory needs the model's config.json",
        )
    except ValueError as exc:
        return Result(
            name,
            Status.fail,
            f"{cfg_file} does not parse: {exc}",
            "restore the model's config.json (download it again)",
        )
    try:
        files, size = model_weights(path)
        unreadable = [p.name for p in files if not os.access(p, os.R_OK)]
    except OSError as exc:
        return Result(name, Status.fail, f"{path}: {exc.strerror}", "")
    if not files:
        return Result(
            name,
            Status.fail,
            f"{path}: no weights (*.safetensors, *.bin, ...)",
            "download the weights into the model directory",
        )
    if unreadable:
        return Result(
            name,
            Status.fail,
            f"{path}: weights not readable: {unreadable[:3]}",
            "make the weight files readable for Sentinel's user",
        )
    arch = ",".join(parsed.get("architectures") or []) or "?"
    return Result(name, Status.ok, f"{path}: {arch}, {len(files)} weight file(s), "
                  f"{_size(size)}")  # fmt: skip


def _weights_size(cfg: SentinelConfig) -> int | None:
    if cfg.engine.command:
        return None
    path = _model_dir(cfg)
    if path is None or not path.is_dir():
        return None
    try:
        files, size = model_weights(path)
    except OSError:
        return None
    return size if files else None


def check_model_fits_gpu(cfg: SentinelConfig, host: Host) -> Result:
    name = "model_fits_gpu"
    g = host.gpus()
    size = _weights_size(cfg)
    if not g.available or not g.gpus or size is None:
        return Result(name, Status.skip, "no GPU" if not g.available else "no local weights")
    util = float(_arg(cfg.engine.args, "--gpu-memory-utilization") or DEFAULT_GPU_UTIL)
    tp = int(_arg(cfg.engine.args, "--tensor-parallel-size", "-tp") or 1)
    pp = int(_arg(cfg.engine.args, "--pipeline-parallel-size", "-pp") or 1)
    idx = cfg.engine.gpu_indices or [d.index for d in g.gpus]
    gpus = [d for d in g.gpus if d.index in idx][: tp * pp]
    budget = sum(d.memory_total for d in gpus) * util
    what = f"weights {_size(size)} against {len(gpus)} GPU(s) x {util} = {_size(budget)}"
    fix = "use more GPUs (--tensor-parallel-size), a quantized model, or raise "
    fix += "--gpu-memory-utilization"
    if size > budget:
        return Result(name, Status.fail, what + ": the weights do not fit", fix)
    if size > 0.8 * budget:
        return Result(name, Status.warn, what + ": little room is left for the KV cache", fix)
    return Result(name, Status.ok, what)


def check_cgroup_memory(cfg: SentinelConfig, host: Host) -> Result:
    name = "cgroup_memory"
    limit = cgroup_memory_limit(host)
    if limit is None:
        return Result(name, Status.ok, "no cgroup memory limit")
    size = _weights_size(cfg)
    if size is None:
        return Result(name, Status.ok, f"cgroup memory limit {_size(limit)}")
    fix = "raise the container's memory limit (Kubernetes resources.limits.memory)"
    if limit < size + GIB:
        return Result(
            name,
            Status.fail,
            f"cgroup memory limit {_size(limit)} is under the "
            f"weights ({_size(size)}) plus 1 GiB: loading is OOM-killed",
            fix,
        )
    if limit < 2 * size + 2 * GIB:
        return Result(
            name,
            Status.warn,
            f"cgroup memory limit {_size(limit)} is tight for "
            f"{_size(size)} of weights (loading reads them through host memory)",
            fix,
        )
    return Result(name, Status.ok, f"cgroup memory limit {_size(limit)}; weights {_size(size)}")


def check_stray_gpu_processes(cfg: SentinelConfig, host: Host) -> Result:
    name = "stray_gpu_processes"
    g = host.gpus()
    if not g.available:
        return Result(name, Status.skip, "no GPU")
    idx = set(cfg.engine.gpu_indices or [d.index for d in g.gpus])
    found = []
    for d in g.gpus:
        if d.index not in idx:
            continue
        for pid, used in d.processes:
            comm = (host.read(host.proc / str(pid) / "comm") or "?").strip()
            found.append(f"pid {pid} ({comm}) holds {_size(used)} on GPU {d.index}")
    if found:
        return Result(name, Status.warn, "; ".join(found[:8]),
                      "stop them before starting the engine (a leftover engine: kill its pids), "
                      "or set supervisor.kill_foreign_gpu_processes")  # fmt: skip
    return Result(name, Status.ok, f"no process on GPU(s) {sorted(idx)}")


def check_vllm(cfg: SentinelConfig, host: Host) -> Result:
    name = "vllm"
    if cfg.engine.command:
        return Result(name, Status.skip, "engine.command is set: Sentinel does not run vLLM's "
                      "module itself")  # fmt: skip
    python = cfg.engine.python or host.python
    v = host.vllm(python)
    if not v.importable:
        return Result(name, Status.fail, f"vLLM does not import in {python}: {v.error}",
                      "install vLLM into that interpreter (pip install vllm), or set "
                      "engine.python to the one that has it")  # fmt: skip
    return Result(name, Status.ok, f"vLLM {v.version} imports in {python}")
