"""Shared by the benchmarks: percentiles, a directly-started tiny vLLM (the baseline), the
GPU copy loop as background load, and the CPU time a hypervisor steals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

import psutil

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ROOT / "var" / "tiny-model"
COPY_LOOP = ROOT / "tests" / "gpu" / "copy_loop.py"
_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
T = TypeVar("T")


def pct(xs: list[float], q: float) -> float:
    """The q-quantile (0..1) of xs, nearest rank; nan for no data."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


# float32: vLLM's bfloat16 CPU kernel uses AMX where the CPU advertises it, and dies with
# SIGILL on VMs that advertise AMX without enabling it (tests/real/harness.py says the same)
ENGINE_ARGS = ["--max-model-len", "256", "--enforce-eager", "--dtype", "float32"]


def tiny_vllm_command(port: int, model: Path = TINY_MODEL) -> list[str]:
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--served-model-name", "tiny",
        *ENGINE_ARGS,
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip


def start_tiny_vllm(
    port: int, log: IO[bytes] | int = subprocess.DEVNULL, cores: list[int] | None = None
) -> subprocess.Popen[bytes]:
    """Real vLLM on the CPU, in its own session (kill the group to stop it).

    ``cores``: every engine process (API server, EngineCore, Worker and its OpenMP
    threads) confined to these CPUs, as a GPU host's engine has its own.
    """
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    pin = None
    if cores:
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cores))  # else it binds them all

        def pin() -> None:
            os.sched_setaffinity(0, cores)

    return subprocess.Popen(
        tiny_vllm_command(port), env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True, preexec_fn=pin,
    )  # fmt: skip


def summarize(ns: list[int], unit: str) -> dict[str, float]:
    """p50/p99/max/mean of nanosecond timings, in ``us`` or ``ms``, keys suffixed by the unit."""
    scale, digits = {"us": (1e3, 1), "ms": (1e6, 3)}[unit]
    xs = [x / scale for x in ns]
    return {
        f"p50_{unit}": round(pct(xs, 0.50), digits),
        f"p99_{unit}": round(pct(xs, 0.99), digits),
        f"max_{unit}": round(max(xs), digits),
        f"mean_{unit}": round(sum(xs) / len(xs), digits),
    }


def steal_s(cpu: int | None = None) -> float:
    """Seconds the hypervisor has taken so far from one CPU, or from all of them
    (/proc/stat steal; 0 where not reported): time nothing of ours could run."""
    prefix = "cpu " if cpu is None else f"cpu{cpu} "
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith(prefix):
                    return int(line.split()[8]) * _TICK_S
    except (OSError, IndexError, ValueError):
        pass
    return 0.0


class CopyLoad:
    """``tests/gpu/copy_loop.py`` in the background: device-to-device copies on GPU 0
    (``duty`` 1: all the time) until ``stop()`` or ``seconds``."""

    def __init__(self, gib: float, duty: float, seconds: float = 3600) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(COPY_LOOP), str(seconds), str(gib), str(duty)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.stop()
            raise RuntimeError(f"copy loop did not start: {line!r}")
        time.sleep(1.0)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def engine_available() -> bool:
    """Real vLLM importable and the tiny model built (`make setup`)."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return (TINY_MODEL / "model.safetensors").exists()


def wait_for(
    predicate: Callable[[], T], timeout: float, interval: float = 0.1, what: str = "condition"
) -> T:
    """Poll until predicate() is truthy; return its value or raise RuntimeError."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SentinelRun:
    """``sentinel run`` as a subprocess on the tiny model, on free loopback ports, for the
    benchmarks (the test suite has its own harness; bench never imports tests)."""

    def __init__(self, tmp: Path, overrides: dict[str, dict[str, object]] | None = None):
        import yaml

        tmp.mkdir(parents=True, exist_ok=True)
        self.engine_port, self.ops_port, self.proxy_port = free_port(), free_port(), free_port()
        cfg: dict[str, dict[str, object]] = {
            "engine": {
                "model": str(TINY_MODEL), "served_model_name": "tiny", "port": self.engine_port,
                "args": list(ENGINE_ARGS),
                "env": {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"},
            },
            "ops": {"host": "127.0.0.1", "port": self.ops_port},
            "proxy": {"host": "127.0.0.1", "port": self.proxy_port},
            "payload_log": {"dir": str(tmp / "payloads")},
            "logging": {"format": "json"},
            "lifecycle": {"runtime_dir": str(tmp / "run")},
        }  # fmt: skip
        for section, values in (overrides or {}).items():
            cfg.setdefault(section, {}).update(values)
        self.config_path = tmp / "sentinel.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.log_path = tmp / "sentinel.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SentinelRun:
        cmd = [sys.executable, "-m", "sentinel", "run", "--config", str(self.config_path)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        return self

    def stop(self, sig: int = 15, timeout: float = 60) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    @property
    def ops_url(self) -> str:
        return f"http://127.0.0.1:{self.ops_port}"

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    def get(self, path: str, timeout: float = 5) -> Any:
        """GET on the ops port (an httpx.Response)."""
        import httpx

        return httpx.get(self.ops_url + path, timeout=timeout)

    def log_records(self) -> list[dict[str, Any]]:
        """Sentinel's JSON log lines, parsed (other lines skipped)."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def sentinel_pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def serves(self) -> bool:
        import httpx

        body = {"model": "tiny", "prompt": "hello", "max_tokens": 4}
        try:
            r = httpx.post(
                f"http://127.0.0.1:{self.engine_port}/v1/completions", json=body, timeout=10
            )
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    def wait_serving(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while not self.serves():
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"sentinel exited {self.proc.returncode}: see {self.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the engine did not serve within {timeout}s")
            time.sleep(1.0)

    def engine_tree(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.sentinel_pid()).children(recursive=True)
        except psutil.NoSuchProcess:
            return []


def role_of(p: psutil.Process) -> str:
    """api_server, engine_core, worker (vLLM retitles the last two) or other."""
    from sentinel.engine.proctree import role_from_cmdline

    cmdline = p.cmdline()
    role = role_from_cmdline(cmdline)
    if role is not None:
        return role
    return "api_server" if "vllm.entrypoints.openai.api_server" in cmdline else "other"
