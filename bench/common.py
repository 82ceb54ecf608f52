"""Shared by the benchmarks: percentiles and a directly-started tiny vLLM (the baseline)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ROOT / "var" / "tiny-model"


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
