"""Shared by the benchmarks: percentiles, a directly-started tiny vLLM (the baseline), the
GPU copy loop as background load, and the CPU time a hypervisor steals."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ROOT / "var" / "tiny-model"
COPY_LOOP = ROOT / "tests" / "gpu" / "copy_loop.py"
_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def pct(xs: list[float], q: float) -> float:
    """The q-quantile (0..1) of xs, nearest rank; nan for no data."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def tiny_vllm_command(port: int, model: Path = TINY_MODEL) -> list[str]:
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--served-model-name", "tiny",
        "--max-model-len", "256", "--enforce-eager",
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
