"""The evidence hook before a restart for a hang (issue 16): awaited with the reason and
detail, bounded by supervisor.evidence_timeout_s, never for other restarts, and a
failing or slow hook never blocks the restart."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from sentinel.config.schema import EngineConfig, LifecycleConfig, SupervisorConfig
from sentinel.engine.supervisor import Supervisor
from sentinel.state import EngineStatus
from tests.helpers import fake_piddir, free_port

FAKE = Path(__file__).with_name("test_engine_fake.py")


def _supervisor(tmp: Path, evidence_timeout_s: float) -> tuple[Supervisor, EngineStatus]:
    port = free_port()
    engine = EngineConfig(
        command=[sys.executable, str(FAKE), "serve", str(port)],
        port=port,
        host="127.0.0.1",
        env={"FAKE_PIDDIR": str(fake_piddir(tmp))},
    )
    cfg = SupervisorConfig(
        stop_grace_s=1.0, kill_grace_s=0.2, backoff_initial_s=0.1,
        evidence_timeout_s=evidence_timeout_s,
    )  # fmt: skip
    status = EngineStatus()
    return Supervisor(engine, cfg, status, lifecycle=LifecycleConfig(runtime_dir=tmp)), status


async def _until(pred, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def test_hook_runs_before_a_hang_restart_bounded_and_not_for_others(tmp_path: Path) -> None:
    sup, status = _supervisor(tmp_path, evidence_timeout_s=0.5)
    calls: list[tuple[str, str, int, bool]] = []

    async def hook(reason: str, detail: str) -> None:
        # the old generation is still there while evidence is taken
        calls.append((reason, detail, status.generation, bool(status.processes)))
        await asyncio.sleep(30)  # far too slow: cut at evidence_timeout_s

    sup.before_hang_restart = hook

    async def scenario() -> None:
        task = asyncio.create_task(sup.run())
        await _until(lambda: status.loaded)
        t0 = time.monotonic()
        sup.request_restart("stalled", "no progress for 30 s")
        await _until(lambda: status.generation == 2 and status.loaded)
        took = time.monotonic() - t0
        assert calls == [("stalled", "no progress for 30 s", 1, True)]
        assert 0.5 <= took < 10
        sup.request_restart("sighup")  # not a hang: no evidence
        await _until(lambda: status.generation == 3 and status.loaded)
        assert len(calls) == 1
        sup.request_stop()
        assert await asyncio.wait_for(task, 30) == 0

    asyncio.run(scenario())


def test_a_failing_hook_does_not_block_the_restart(tmp_path: Path) -> None:
    sup, status = _supervisor(tmp_path, evidence_timeout_s=5)

    async def hook(reason: str, detail: str) -> None:
        raise RuntimeError("py-spy not installed")

    sup.before_hang_restart = hook

    async def scenario() -> None:
        task = asyncio.create_task(sup.run())
        await _until(lambda: status.loaded)
        sup.request_restart("not_ready", "probe failing for 300 s")
        await _until(lambda: status.generation == 2 and status.loaded)
        assert status.restarts[-1].reason == "not_ready"
        sup.request_stop()
        assert await asyncio.wait_for(task, 30) == 0

    asyncio.run(scenario())


def test_launch_waits_for_gpu_memory_of_the_old_generation(tmp_path: Path) -> None:
    """NVML (faked) still lists the old API server's memory after it died: the next
    generation waits; if the memory stays held past gpu_release_timeout_s, the engine is
    not launched and `failed` names the pid and the memory."""
    sup, status = _supervisor(tmp_path, evidence_timeout_s=1)
    sup.life = sup.life.model_copy(update={"gpu_release_timeout_s": 1.5})
    held: dict[str, object] = {"pids": []}

    def gpu_processes() -> list[tuple[int, int, int]]:
        return [(pid, 0, 3 * 2**30) for pid in held["pids"]]  # type: ignore[union-attr]

    sup.gpu_processes = gpu_processes

    async def scenario() -> None:
        task = asyncio.create_task(sup.run())
        await _until(lambda: status.loaded)
        old = status.processes[0].pid
        held["pids"] = [old]
        sup.request_restart("sighup")
        await asyncio.sleep(1.0)
        assert status.generation == 1, "launched while the old memory was still held"
        held["pids"] = []  # released
        await _until(lambda: status.generation == 2 and status.loaded)
        # now it stays held: not launched, failed names pid and MiB
        old = status.processes[0].pid
        held["pids"] = [old]
        sup.request_restart("sighup")
        await _until(lambda: status.lifecycle.value == "failed")
        assert f"pid {old} holds 3072 MiB on GPU 0" in (status.failure_reason or "")
        assert status.generation == 2
        sup.request_stop()
        await asyncio.wait_for(task, 30)

    asyncio.run(scenario())
