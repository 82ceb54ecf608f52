"""`sentinel doctor`: every check where it passes and, where it can be provoked, where
it fails with its fix; host facts are injected (a fake /proc, /dev/shm, cgroup, NVML)."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sentinel.config.schema import SentinelConfig
from sentinel.doctor import Host, Status, run_checks
from sentinel.doctor.base import GIB, MIB, GpuFacts, GpuInfo, VllmFacts
from sentinel.doctor.checks import exit_status
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
NO_GPU = GpuFacts(False, "NVML Shared Library Not Found")


def statvfs(size: int, free: int | None = None) -> Any:
    blocks, avail = size // 4096, (size if free is None else free) // 4096
    return lambda _path: os.statvfs_result((4096, 4096, blocks, avail, avail, 0, 0, 0, 0, 255))


def h200(n: int = 1, processes: tuple[tuple[int, int], ...] = ()) -> GpuFacts:
    gpus = tuple(GpuInfo(i, "NVIDIA H200", 141 * GIB, processes) for i in range(n))
    return GpuFacts(True, "", "580.65", "13.0", gpus)


def host(tmp: Path, **kw: Any) -> Host:
    proc = tmp / "proc"
    (proc / "self").mkdir(parents=True, exist_ok=True)
    (proc / "1").mkdir(exist_ok=True)
    defaults: dict[str, Any] = {
        "environ": {"PATH": "/usr/bin"},
        "proc": proc,
        "cgroup": tmp / "cgroup",
        "statvfs": statvfs(16 * GIB),
        "nofile": lambda: (1048576, 1048576),
        "cpus": lambda: 16,
        "gpu": lambda: NO_GPU,
        "vllm": lambda _py: VllmFacts(True, "0.32.0"),
        "torch_cuda": lambda: (True, None),
        "which": lambda _name: "/usr/bin/py-spy",
    }
    defaults.update(kw)
    return Host(**defaults)


def model_dir(tmp: Path, weights: int = 1 * MIB, config: str | None = None) -> Path:
    d = tmp / "model"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(config or json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with open(d / "model.safetensors", "wb") as f:
        f.truncate(weights)  # sparse: a size without the disk
    return d


def cfg(tmp: Path, **sections: dict[str, Any]) -> SentinelConfig:
    base: dict[str, Any] = {
        "engine": {"model": str(model_dir(tmp)), "port": free_port()},
        "ops": {"port": free_port()},
        "proxy": {"port": free_port()},
        "payload_log": {"dir": str(tmp / "payloads")},
    }
    for k, v in sections.items():
        base.setdefault(k, {}).update(v)
    return SentinelConfig.model_validate(base)


def one(tmp: Path, name: str, c: SentinelConfig | None = None, **kw: Any):  # noqa: ANN201
    (r,) = run_checks(c or cfg(tmp), host(tmp, **kw), only={name})
    return r


def test_a_healthy_cpu_host_passes_with_gpu_checks_skipped(tmp_path: Path) -> None:
    results = run_checks(cfg(tmp_path), host(tmp_path))
    by = {r.name: r for r in results}
    assert exit_status(results) == 0
    for name in ("nvml", "cuda", "stray_gpu_processes", "pytorch_alloc_conf", "model_fits_gpu"):
        assert by[name].status == Status.skip, by[name]
    for name in ("vllm", "model", "cgroup_memory", "cpus", "shm", "open_files", "ptrace",
                 "disk", "ports"):  # fmt: skip
        assert by[name].status == Status.ok, by[name]


def test_shm(tmp_path: Path) -> None:
    r = one(tmp_path, "shm", statvfs=statvfs(64 * MIB))
    assert r.status == Status.fail and "64 MiB" in r.summary and "--shm-size" in r.fix
    assert one(tmp_path, "shm", statvfs=statvfs(512 * MIB)).status == Status.warn
    assert one(tmp_path, "shm", statvfs=statvfs(16 * GIB)).status == Status.ok


def test_shm_on_a_real_small_tmpfs(tmp_path: Path) -> None:
    mnt = tmp_path / "shm"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)],
                       capture_output=True)  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        res = one(tmp_path, "shm", shm=mnt, statvfs=os.statvfs)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
    assert res.status == Status.fail and "64 MiB" in res.summary


def test_port_taken_names_the_holder(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        c = cfg(tmp_path, engine={"port": port})
        r = one(tmp_path, "ports", c)
    assert r.status == Status.fail
    assert f"engine.port {port}" in r.summary and f"pid {os.getpid()}" in r.summary
    assert "choose another port" in r.fix
    assert one(tmp_path, "ports").status == Status.ok
    same = cfg(tmp_path, ops={"port": 18555}, proxy={"port": 18555})
    assert "both 18555" in one(tmp_path, "ports", same).summary


def test_model(tmp_path: Path) -> None:
    ok = one(tmp_path, "model")
    assert ok.status == Status.ok and "LlamaForCausalLM" in ok.summary
    r = one(tmp_path, "model", cfg(tmp_path, engine={"model": str(tmp_path / "nope")}))
    assert r.status == Status.fail and "no such directory" in r.summary and r.fix
    c = cfg(tmp_path)
    (tmp_path / "model" / "config.json").write_text("{not json")
    r = one(tmp_path, "model", c)
    assert r.status == Status.fail and "does not parse" in r.summary
    (tmp_path / "model" / "config.json").unlink()
    assert "config.json" in one(tmp_path, "model", c).summary
    model_dir(tmp_path)
    (tmp_path / "model" / "model.safetensors").unlink()
    r = one(tmp_path, "model", c)
    assert r.status == Status.fail and "no weights" in r.summary
    hub = cfg(tmp_path, engine={"model": "meta-llama/Llama-3.1-8B"})
    assert one(tmp_path, "model", hub).status == Status.warn
    offline = cfg(tmp_path, engine={"model": "org/m", "env": {"HF_HUB_OFFLINE": "1"}})
    assert one(tmp_path, "model", offline).status == Status.fail


def test_unwritable_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    c = cfg(tmp_path, payload_log={"dir": str(blocker / "payloads")})
    r = one(tmp_path, "disk", c)
    assert r.status == Status.fail and "not writable" in r.summary and r.fix
    small = one(tmp_path, "disk", statvfs=statvfs(16 * GIB, free=10 * MIB))
    assert small.status == Status.warn and "max_total_bytes" in small.fix


def test_open_files(tmp_path: Path) -> None:
    r = one(tmp_path, "open_files", nofile=lambda: (1024, 1024))
    assert r.status == Status.fail and "ulimit" in r.fix
    assert one(tmp_path, "open_files", nofile=lambda: (1024, 1048576)).status == Status.ok
    assert one(tmp_path, "open_files", nofile=lambda: (8192, 8192)).status == Status.warn


def test_a_lowered_open_file_limit_fails_the_cli(tmp_path: Path) -> None:
    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    r = subprocess.run(
        [sys.executable, "-m", "sentinel", "doctor", "--check", "open_files", "--json"],
        capture_output=True, text=True, cwd=ROOT, preexec_fn=lower, timeout=60,
    )  # fmt: skip
    assert r.returncode == 1, r.stderr
    (check,) = json.loads(r.stdout)["checks"]
    assert check["status"] == "fail" and "1024" in check["summary"] and check["fix"]


def test_ptrace(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "sys" / "kernel" / "yama").mkdir(parents=True)
    (proc / "self").mkdir(parents=True, exist_ok=True)
    scope = proc / "sys" / "kernel" / "yama" / "ptrace_scope"
    status = proc / "self" / "status"
    scope.write_text("1\n")
    status.write_text("Name:\tx\nCapEff:\t00000000a80425fb\n")  # Docker's default: no ptrace
    r = one(tmp_path, "ptrace")
    assert r.status == Status.warn and "SYS_PTRACE" in r.fix
    status.write_text("CapEff:\t00000000a80c25fb\n")  # + CAP_SYS_PTRACE (bit 19)
    assert one(tmp_path, "ptrace").status == Status.ok
    scope.write_text("3\n")
    assert one(tmp_path, "ptrace").status == Status.fail
    scope.write_text("0\n")
    r = one(tmp_path, "ptrace", which=lambda _n: None)
    assert r.status == Status.warn and "py-spy" in r.fix


def test_cgroup_memory(tmp_path: Path) -> None:
    (tmp_path / "cgroup").mkdir()
    c = cfg(tmp_path)
    model_dir(tmp_path, weights=4 * GIB)
    (tmp_path / "cgroup" / "memory.max").write_text("max\n")
    assert one(tmp_path, "cgroup_memory", c).status == Status.ok
    (tmp_path / "cgroup" / "memory.max").write_text(f"{2 * GIB}\n")
    r = one(tmp_path, "cgroup_memory", c)
    assert r.status == Status.fail and "4.0 GiB" in r.summary and r.fix
    (tmp_path / "cgroup" / "memory.max").write_text(f"{8 * GIB}\n")
    assert one(tmp_path, "cgroup_memory", c).status == Status.warn
    (tmp_path / "cgroup" / "memory.max").write_text(f"{64 * GIB}\n")
    assert one(tmp_path, "cgroup_memory", c).status == Status.ok


def test_gpu_checks_with_a_fake_nvml(tmp_path: Path) -> None:
    gpu = {"gpu": lambda: h200(2)}
    assert one(tmp_path, "nvml", **gpu).status == Status.ok
    r = one(tmp_path, "cuda", torch_cuda=lambda: (True, "13.1"), **gpu)
    assert r.status == Status.fail and "driver" in r.fix
    assert one(tmp_path, "cuda", torch_cuda=lambda: (True, "12.8"), **gpu).status == Status.ok
    assert one(tmp_path, "cuda", torch_cuda=lambda: (True, None), **gpu).status == Status.fail
    r = one(tmp_path, "pytorch_alloc_conf", **gpu)
    assert r.status == Status.warn and "expandable_segments" in r.fix
    good = cfg(tmp_path, engine={"env": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}})
    assert one(tmp_path, "pytorch_alloc_conf", good, **gpu).status == Status.ok
    bad = cfg(tmp_path, engine={"env": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments"}})
    assert one(tmp_path, "pytorch_alloc_conf", bad).status == Status.fail
    assert one(tmp_path, "nvml", gpu=lambda: GpuFacts(True, "", "580", "13.0")).status == (
        Status.fail
    )


def test_model_fits_gpu(tmp_path: Path) -> None:
    c = cfg(tmp_path)
    tp2 = cfg(tmp_path, engine={"args": ["--tensor-parallel-size", "2"]})
    tp4 = cfg(tmp_path, engine={"args": ["--tensor-parallel-size=4"]})
    model_dir(tmp_path, weights=210 * GIB)  # 141 GiB x 0.9 per GPU
    r = one(tmp_path, "model_fits_gpu", c, gpu=lambda: h200(2))
    assert r.status == Status.fail and "tensor-parallel" in r.fix  # one GPU without -tp
    assert one(tmp_path, "model_fits_gpu", tp2, gpu=lambda: h200(2)).status == Status.warn
    assert one(tmp_path, "model_fits_gpu", tp4, gpu=lambda: h200(4)).status == Status.ok


def test_cpus_per_gpu_and_stray_processes(tmp_path: Path) -> None:
    r = one(tmp_path, "cpus", gpu=lambda: h200(8), cpus=lambda: 8)
    assert r.status == Status.fail and "4 CPUs per GPU" in r.fix
    assert one(tmp_path, "cpus", gpu=lambda: h200(2), cpus=lambda: 32).status == Status.ok
    (tmp_path / "proc" / "4242").mkdir(parents=True)
    (tmp_path / "proc" / "4242" / "comm").write_text("python\n")
    r = one(tmp_path, "stray_gpu_processes", gpu=lambda: h200(1, ((4242, 30 * GIB),)))
    assert r.status == Status.warn and "pid 4242 (python)" in r.summary
    assert "kill_foreign_gpu_processes" in r.fix
    assert one(tmp_path, "stray_gpu_processes", gpu=lambda: h200(1)).status == Status.ok


def test_vllm_and_pid1(tmp_path: Path) -> None:
    bad = VllmFacts(False, error="ModuleNotFoundError: No module named 'vllm'")
    r = one(tmp_path, "vllm", vllm=lambda _py: bad)
    assert r.status == Status.fail and "No module named" in r.summary and "engine.python" in r.fix
    (tmp_path / "proc" / "1" / "comm").write_text("bash\n")
    (tmp_path / "proc" / "1" / "cmdline").write_text("/bin/bash\0start.sh\0")
    r = one(tmp_path, "pid1")
    assert r.status == Status.warn and "tini" in r.fix
    (tmp_path / "proc" / "1" / "comm").write_text("tini\n")
    assert one(tmp_path, "pid1").status == Status.ok


def test_a_check_that_raises_is_a_failure_not_a_traceback(tmp_path: Path) -> None:
    def boom() -> int:
        raise RuntimeError("no affinity")

    r = one(tmp_path, "cpus", cpus=boom)
    assert r.status == Status.fail and "no affinity" in r.summary


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sentinel", "doctor", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)  # fmt: skip


def test_cli_json_and_bad_input(tmp_path: Path) -> None:
    r = cli("--json", "--check", "shm", "--check", "disk", "--check", "open_files")
    doc = json.loads(r.stdout)
    assert {c["check"] for c in doc["checks"]} == {"shm", "disk", "open_files"}
    assert r.returncode == (1 if doc["status"] == "fail" else 0)
    for args, needle in (
        (["--bogus"], "No such option"),
        (["--config", str(tmp_path / "missing.yaml")], "cannot read"),
        (["--check", "nonsense"], "unknown check 'nonsense'"),
        (["--set", "engine.port=eighty"], "engine.port"),
    ):
        r = cli(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert needle in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_secrets_names_each_missing_source_and_never_a_value(tmp_path: Path) -> None:
    keys = tmp_path / "clients.keys"
    keys.write_text("")
    c = cfg(
        tmp_path,
        engine={"api_key_env": "ENGINE_KEY"},
        proxy={
            "tiers": [
                {"name": "local", "kind": "local"},
                {"name": "ext", "base_url": "https://api.example.com", "api_key_env": "EXT_KEY"},
            ],
            "auth": {"keys_file": str(keys)},
        },
    )
    r = one(tmp_path, "secrets", c)
    assert r.status == Status.fail
    assert "ENGINE_KEY is not set" in r.summary
    assert "tier 'ext': environment variable EXT_KEY is not set" in r.summary
    assert f"keys_file {keys} holds no key" in r.summary
    assert "refuses to start" in r.fix

    keys.write_text("team-a: sk-client-0123456789abcdef\n")
    env = {"ENGINE_KEY": "sk-engine-0123456789", "EXT_KEY": "sk-ext-secret-value"}
    r = one(tmp_path, "secrets", c, environ=env)
    assert r.status == Status.ok, r
    assert "engine.api_key_env (ENGINE_KEY)" in r.summary and "tier ext" in r.summary
    assert "client keys" in r.summary
    for value in (*env.values(), "sk-client-0123456789abcdef"):
        assert value not in r.summary + r.fix

    env["EXT_KEY"] = "sk-ext\r\nx-injected: 1"
    r = one(tmp_path, "secrets", c, environ=env)
    assert r.status == Status.fail and "line break" in r.summary
    assert "x-injected" not in r.summary


def test_secrets_checks_the_admin_token_as_sentinel_run_reads_it(tmp_path: Path) -> None:
    token = tmp_path / "admin-token"
    token.write_text("abcdefghij012345\nsecond-line-xyz\n")
    c = cfg(tmp_path, ops={"admin": {"token_file": str(token)}})
    r = one(tmp_path, "secrets", c, environ={})
    assert r.status == Status.fail and "ops.admin.token_file" in r.summary, r
    assert "line break" in r.summary and "second-line" not in r.summary + r.fix
    token.write_text("abcdefghij0123456789\n")
    r = one(tmp_path, "secrets", c, environ={})
    assert r.status == Status.ok and "admin token" in r.summary, r
    c = cfg(tmp_path, ops={"admin": {"token_env": "ADMIN_TOK"}})
    r = one(tmp_path, "secrets", c, environ={"ADMIN_TOK": "abcdefghij0123456789"})
    assert r.status == Status.ok and "admin token" in r.summary, r


def test_secrets_refuses_a_paid_tier_without_client_keys(tmp_path: Path) -> None:
    c = cfg(
        tmp_path,
        proxy={
            "tiers": [
                {"name": "local", "kind": "local"},
                {"name": "ext", "base_url": "https://api.example.com", "api_key_env": "EXT_KEY"},
            ],
        },
    )
    r = one(tmp_path, "secrets", c, environ={"EXT_KEY": "sk-ext-secret-value"})
    assert r.status == Status.fail and "allow_anonymous" in r.summary
    assert one(tmp_path, "secrets", environ={}).summary == "no API key sources configured"


def test_cli_secrets_fails_on_an_unset_engine_key_variable(tmp_path: Path) -> None:
    var = "SENTINEL_TEST_UNSET_ENGINE_KEY"
    assert var not in os.environ
    r = cli("--json", "--check", "secrets", "--set", f"engine.api_key_env={var}")
    doc = json.loads(r.stdout)
    assert r.returncode == 1, r.stderr
    (check,) = doc["checks"]
    assert check["status"] == "fail" and f"{var} is not set" in check["summary"]
