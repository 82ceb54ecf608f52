"""Processes that will not die (issue 16), through a fake process table: /proc files
written by the test, and a supervisor whose SIGKILL does not reach one process."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client import CollectorRegistry

from sentinel.config.schema import EngineConfig, LifecycleConfig, SupervisorConfig
from sentinel.engine import proctree
from sentinel.engine.supervisor import Supervisor
from sentinel.lifecycle.drain import DrainMetrics
from sentinel.ops.stack import unkillable_problem
from sentinel.state import EngineStatus
from tests.fuse_stuck import StuckFuse
from tests.helpers import fake_piddir, free_port, wait_for

# _no_leftovers: a Sentinel the FUSE test started is killed even when the test fails
from tests.unit.test_lifecycle_run import LRun, _no_leftovers  # noqa: F401

FAKE = Path(__file__).with_name("test_engine_fake.py")


def _fake_proc(root: Path, pid: int, state: str, wchan: str | None) -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    (d / "stat").write_text(f"{pid} (VLLM::Worker) {state} 1 {pid} {pid} 0 -1 4194560 " + "0 " * 40)
    if wchan is not None:
        (d / "wchan").write_text(wchan)


def test_describe_stuck_reads_state_and_wait_channel(tmp_path: Path) -> None:
    _fake_proc(tmp_path, 4242, "D", "nv_wait_for_gpu")
    _fake_proc(tmp_path, 4243, "S", None)
    d = proctree.describe_stuck(4242, str(tmp_path))
    assert d == {
        "pid": 4242,
        "state": "D",
        "state_name": "uninterruptible sleep",
        "wchan": "nv_wait_for_gpu",
    }
    assert proctree.describe_stuck(4243, str(tmp_path))["wchan"] == "unknown"
    assert proctree.describe_stuck(4244, str(tmp_path))["state"] == "gone"


class _Stuck:
    """A psutil.Process stand-in that ignores every signal (state D)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[int] = []

    def is_running(self) -> bool:
        return True

    def status(self) -> str:
        return psutil.STATUS_DISK_SLEEP

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)


def test_terminate_reports_a_process_surviving_sigkill() -> None:
    stuck = _Stuck(999_999)
    member = proctree.Member(stuck.pid, 1.0, "worker", stuck)  # type: ignore[arg-type]
    report = asyncio.run(proctree.terminate(lambda: [member], 0.05, lambda: None, kill_wait_s=0.2))
    assert report.survivors == [stuck.pid]
    assert signal.SIGKILL in stuck.signals and signal.SIGTERM in stuck.signals
    assert 0.2 <= report.seconds < 2


def test_unkillable_state_metric_and_livez_reason() -> None:
    status = EngineStatus()
    registry = CollectorRegistry()
    DrainMetrics(registry, status)
    assert registry.get_sample_value("sentinel_engine_unkillable") == 0
    assert unkillable_problem(status, True) is None
    status.set_unkillable([{"pid": 7, "state": "D", "wchan": "nv_wait", "role": "worker"}])
    assert status.state().value == "unkillable"
    assert status.snapshot()["unkillable"][0]["wchan"] == "nv_wait"
    assert registry.get_sample_value("sentinel_engine_unkillable") == 1
    problem = unkillable_problem(status, True)
    assert problem is not None and "pid 7 (D, wchan nv_wait)" in problem
    assert unkillable_problem(status, False) is None


@pytest.mark.timeout(90)
def test_supervisor_marks_unkillable_does_not_relaunch_until_it_is_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Worker 'survives' SIGKILL (the signal is withheld from it): the generation
    ends in state unkillable naming it, no new engine is launched; once it is really
    gone, the engine is launched again."""
    port = free_port()
    engine = EngineConfig(
        command=[sys.executable, str(FAKE), "serve", str(port)],
        port=port,
        host="127.0.0.1",
        env={"FAKE_PIDDIR": str(fake_piddir(tmp_path))},
    )
    sup_cfg = SupervisorConfig(stop_grace_s=1.0, kill_grace_s=0.2, backoff_initial_s=0.1)
    life = LifecycleConfig(runtime_dir=tmp_path / "run", unkillable_after_s=0.5)
    status = EngineStatus()
    sup = Supervisor(engine, sup_cfg, status, lifecycle=life)
    real_signal = proctree.signal_member
    withheld: dict[str, int] = {}

    def signal_member(member: proctree.Member, sig: int) -> bool:
        if member.role == "worker" and not withheld.get("release"):
            withheld["pid"] = member.pid
            return True  # "sent", and nothing happens: a process stuck in the kernel
        return real_signal(member, sig)

    monkeypatch.setattr(proctree, "signal_member", signal_member)

    async def scenario() -> None:
        task = asyncio.create_task(sup.run())
        for _ in range(300):
            if status.loaded and {p.role for p in status.processes} >= {"worker"}:
                break
            await asyncio.sleep(0.05)
        assert status.loaded, "the fake engine did not load"
        sup.request_restart("sighup")
        for _ in range(200):
            if status.unkillable:
                break
            await asyncio.sleep(0.05)
        assert status.unkillable and status.unkillable[0]["pid"] == withheld["pid"]
        assert status.unkillable[0]["role"] == "worker"
        assert status.state().value == "unkillable"
        gen = status.generation
        await asyncio.sleep(1.5)
        assert status.generation == gen, "launched again while a process is unkillable"
        withheld["release"] = 1
        psutil.Process(withheld["pid"]).kill()  # the kernel lets go
        for _ in range(400):
            if status.generation > gen and not status.unkillable and status.loaded:
                break
            await asyncio.sleep(0.05)
        assert not status.unkillable and status.generation == gen + 1 and status.loaded
        sup.request_stop()
        assert await asyncio.wait_for(task, 30) == 0

    asyncio.run(scenario())


@pytest.mark.skipif(not StuckFuse.available(), reason="needs root and /dev/fuse")
@pytest.mark.timeout(120)
def test_a_real_process_in_uninterruptible_sleep_makes_the_engine_unkillable(
    tmp_path: Path,
) -> None:
    """The fake engine's Worker touches a file on a FUSE mount that never answers; after
    SIGKILL it sits in state D. Sentinel reports it (state, wait channel, metric, /livez),
    launches nothing, and launches again once the kernel lets go of it."""
    fuse = StuckFuse(tmp_path / "mnt")
    try:
        fuse.mount()
    except OSError as exc:
        pytest.skip(f"cannot mount FUSE here: {exc}")
    run: LRun | None = None
    try:
        run = LRun(
            tmp_path / "run",
            env={"FAKE_STUCK_PATH": str(tmp_path / "mnt" / "x")},
            over={
                "lifecycle": {"runtime_dir": str(tmp_path / "rt"), "unkillable_after_s": 1.0},
                "supervisor": {"kill_grace_s": 0.5, "stop_grace_s": 1.0},
            },
        )
        ops = run.ops
        run.wait_ready()
        wait_for(lambda: fuse.requests, 10, what="the Worker to reach the FUSE mount")
        run.proc.send_signal(signal.SIGHUP)  # replace the generation: the Worker cannot go

        def unkillable() -> list[dict[str, object]]:
            return httpx.get(ops + "/status").json()["unkillable"]

        procs = wait_for(unkillable, 30, what="state unkillable")
        assert procs[0]["state"] == "D" and procs[0]["wchan"] == "request_wait_answer"
        assert procs[0]["role"] == "worker"
        st = httpx.get(ops + "/status").json()
        assert st["state"] == "unkillable"
        livez = httpx.get(ops + "/livez")
        assert livez.status_code == 503 and "survive SIGKILL" in livez.json()["reason"]
        assert "sentinel_engine_unkillable 1.0" in httpx.get(ops + "/metrics").text
        time.sleep(2)
        assert httpx.get(ops + "/status").json()["generation"] == st["generation"]  # no loop
        events = [r for r in run.records() if "survives SIGKILL" in str(r.get("event"))]
        assert len(events) == 1 and events[0]["wchan"] == "request_wait_answer"
        fuse.release()  # the kernel lets go: the Worker dies, a new engine is launched
        wait_for(lambda: not unkillable(), 30, what="unkillable cleared")
        wait_for(
            lambda: httpx.get(ops + "/status").json()["generation"] == st["generation"] + 1,
            30,
            what="a new generation",
        )
        assert httpx.get(ops + "/livez").status_code == 200
    finally:
        fuse.release()
        if run is not None:
            if run.proc.poll() is None:
                run.proc.send_signal(signal.SIGTERM)
                run.proc.wait(30)
            run._log.close()
