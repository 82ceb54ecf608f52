"""The CPU-busy / GPU-idle rule against a real GPU (skipped without NVML).

A process that holds GPU memory and spins a core in a named function while its GPU
idles is caught, and its saved dump shows the function; a process that keeps the GPU
busy (the copy loop, which also keeps a core busy in synchronize) is not. Each runs
alone on GPU 0: utilisation is per device.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from prometheus_client import CollectorRegistry

from sentinel.collectors.gpu import GpuPoller
from sentinel.config import SentinelConfig
from sentinel.config.schema import GpuConfig
from sentinel.state import EngineStatus, Lifecycle, ProcessInfo
from sentinel.watchdogs.service import Watchdogs

COPY_LOOP = Path(__file__).with_name("copy_loop.py")
SPIN_FUNCTION = "p17_gpu_idle_spin_marker"
IDLE_SPINNER = f"""
import sys, time
import torch
held = torch.empty(64 * 1024 * 1024, dtype=torch.float32, device="cuda")  # 256 MiB
torch.cuda.synchronize()
print("ready", flush=True)
def {SPIN_FUNCTION}(seconds):
    end = time.monotonic() + seconds
    x = 0
    while time.monotonic() < end:
        x += 1
{SPIN_FUNCTION}(float(sys.argv[1]))
"""
FOR_S = 5.0


def _start(argv: list[str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != "ready":
        proc.kill()
        pytest.skip(f"cannot hold GPU memory here (torch with CUDA needed): {line!r}")
    return proc


def _watch(tmp_path: Path, proc: subprocess.Popen[str], seconds: float) -> tuple[Watchdogs, list]:
    cfg = SentinelConfig.model_validate(
        {
            "incidents": {"dir": str(tmp_path / "incidents")},
            "watchdogs": {
                "stuck": {"for_s": FOR_S, "interval_s": 0.5, "cpu_busy_ratio": 0.8},
                "dump": {"min_interval_s": 0},
            },
        }
    )
    status = EngineStatus()
    status.new_generation()
    status.mark_loaded()
    status.set_lifecycle(Lifecycle.running)
    status.set_readiness(True, {})  # a ready engine: only the GPU rule may fire
    status.set_processes(
        [ProcessInfo(proc.pid, "worker", 1, psutil.Process(proc.pid).create_time())]
    )
    poller = GpuPoller(GpuConfig(poll_interval_s=0.5), status, lambda: {proc.pid})
    assert poller.open(), poller.snapshot.reason
    restarts: list = []
    dogs = Watchdogs(
        cfg,
        status,
        CollectorRegistry(),
        request_restart=lambda r, d: restarts.append((r, d)),
        gpu_snapshot=lambda: poller.snapshot,
    )

    async def main() -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            await asyncio.to_thread(poller.refresh_slow)  # the process list, when due
            await asyncio.to_thread(poller.poll_once)
            await dogs.stuck.check()
            await asyncio.sleep(0.5)
        await asyncio.sleep(1.0)  # a capture in flight finishes

    try:
        asyncio.run(main())
    finally:
        poller.close()
    return dogs, restarts


def test_cpu_busy_gpu_idle_process_is_caught_and_dumped(tmp_path: Path) -> None:
    proc = _start([sys.executable, "-c", IDLE_SPINNER, "120"])
    try:
        dogs, _ = _watch(tmp_path, proc, FOR_S + 10)
    finally:
        proc.kill()
        proc.wait()
    trigger = dogs.stuck.last_trigger
    assert trigger is not None and trigger["reason"] == "cpu_busy_gpu_idle", trigger
    dumps = sorted((tmp_path / "incidents").glob("*-dump-cpu_busy_gpu_idle-*"))
    assert dumps, "no dump saved"
    assert SPIN_FUNCTION in (dumps[0] / f"worker-{proc.pid}.txt").read_text()


def test_process_keeping_the_gpu_busy_is_not_flagged(tmp_path: Path) -> None:
    proc = _start([sys.executable, str(COPY_LOOP), "120", "1", "1"])
    try:
        dogs, restarts = _watch(tmp_path, proc, FOR_S + 10)
    finally:
        proc.kill()
        proc.wait()
    assert dogs.stuck.last_trigger is None, dogs.stuck.last_trigger
    assert not list((tmp_path / "incidents").glob("*-dump-*")) and not restarts
