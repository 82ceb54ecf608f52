"""Attach mode (issue 18) with fakes: discovery's edge cases on plain data, recovery's
rules (disallowed, holdoff, start-up grace) on real `sleep` processes standing in for the
engine's. The real engine: tests/real/test_attach.py."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import psutil
import pytest
from pydantic import ValidationError

from sentinel.config.schema import AttachConfig, SentinelConfig
from sentinel.engine.attach import AttachedEngine
from sentinel.engine.discovery import Discovery, Found, Proc, discover, read_pid_file, select
from sentinel.state import EngineStatus, Lifecycle

CFG = AttachConfig()
API = ("/usr/bin/python3", "-m", "vllm.entrypoints.openai.api_server", "--port", "8001")


def procs(*extra: Proc) -> list[Proc]:
    return [
        Proc(1, 0, 1.0, ("/sbin/init",)),
        Proc(10, 1, 2.0, API),
        Proc(11, 10, 3.0, ("VLLM::EngineCore",)),
        Proc(12, 11, 4.0, ("VLLM::Worker_TP0",)),
        Proc(13, 10, 5.0, ("/usr/bin/python3", "-c", "from multiprocessing.resource_tracker")),
        Proc(20, 1, 6.0, ("sleep", "100")),
        *extra,
    ]


# ---- discovery ---------------------------------------------------------------------
def test_finds_api_server_and_roles_of_its_descendants() -> None:
    d = select(procs(), CFG, 8001)
    assert d.problem is None
    assert [(m.pid, m.role) for m in d.members] == [
        (10, "api_server"),
        (11, "engine_core"),
        (13, "other"),
        (12, "worker"),
    ]
    assert d.identity == (10, 2.0)


def test_no_engine_is_no_problem_and_no_members() -> None:
    d = select([p for p in procs() if p.pid not in (10, 11, 12, 13)], CFG, 8001)
    assert d.members == [] and d.problem is None and d.identity is None


def test_duplicates_are_told_apart_by_port_or_refused() -> None:
    other = Proc(30, 1, 7.0, ("vllm", "serve", "m", "--port=9000"))
    d = select(procs(other), CFG, 8001)
    assert d.api_server is not None and d.api_server.pid == 10
    assert select(procs(other), CFG, 9000).api_server == Found(30, "api_server", 7.0)
    # neither names the port: none chosen, the problem names both pids and the way out
    d = select(procs(other), CFG, 7777)
    assert d.members == [] and d.candidates == [10, 30]
    assert d.problem is not None and "10, 30" in d.problem and "pid_file" in d.problem
    # a lone match on another port is someone else's engine, not taken
    d = select(procs(), CFG, 9000)
    assert d.members == [] and "8001" in (d.problem or "") and "9000" in (d.problem or "")
    assert select(procs(), CFG, 8001).api_server is not None


def test_a_match_inside_an_engine_tree_and_sentinel_itself_are_not_candidates() -> None:
    child = Proc(14, 10, 8.0, ("/bin/sh", "-c", "vllm serve helper"))
    shell = Proc(40, 1, 9.0, ("bash", "-c", "vllm serve x; sentinel run"))
    d = select(procs(child, shell), CFG, None, exclude={40})
    assert d.problem is None and d.api_server is not None and d.api_server.pid == 10


def test_pid_file_wins_and_a_stale_or_bad_one_is_named(tmp_path: Path) -> None:
    d = select(procs(), CFG, None, pid_from_file=20)
    assert d.api_server == Found(20, "api_server", 6.0)
    d = select(procs(), CFG, None, pid_from_file=99)
    assert d.members == [] and "99" in (d.problem or "")
    f = tmp_path / "engine.pid"
    assert read_pid_file(f)[0] is None and "cannot read" in (read_pid_file(f)[1] or "")
    f.write_text("garbage")
    assert "not a pid" in (read_pid_file(f)[1] or "")
    f.write_text(f"{psutil.Process().pid}\n")
    found = discover(AttachConfig(pid_file=f), None)
    assert found.api_server is not None and found.api_server.pid == psutil.Process().pid


def test_attach_config_is_checked() -> None:
    with pytest.raises(ValidationError, match="http"):
        SentinelConfig.model_validate({"engine": {"attach": {"base_url": "127.0.0.1:8001"}}})
    with pytest.raises(ValidationError, match="non-empty"):
        SentinelConfig.model_validate({"engine": {"attach": {"api_server_match": [""]}}})
    with pytest.raises(ValidationError, match="mode"):
        SentinelConfig.model_validate({"engine": {"mode": "adopt"}})
    cfg = SentinelConfig.model_validate(
        {"engine": {"mode": "attach", "attach": {"base_url": "http://10.0.0.2:8123/"}}}
    )
    assert cfg.engine.attach_url() == "http://10.0.0.2:8123"
    assert cfg.engine.attach_port() == 8123
    assert SentinelConfig().engine.mode == "launch"


# ---- recovery ----------------------------------------------------------------------
class Engine:
    """`sleep` processes as the engine's API server and EngineCore; replaceable."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.start()

    def start(self) -> None:
        self.procs = [subprocess.Popen(["sleep", "300"]) for _ in range(2)]

    def discovery(self) -> Discovery:
        live = [p for p in self.procs if p.poll() is None]
        if len(live) < len(self.procs):
            return Discovery()
        roles = ("api_server", "engine_core")
        return Discovery(
            members=[
                Found(p.pid, r, psutil.Process(p.pid).create_time())
                for p, r in zip(self.procs, roles, strict=True)
            ]
        )

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


@pytest.fixture
def engine() -> object:
    e = Engine()
    yield e
    e.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def attached(engine: Engine, clock: Clock, **attach: object) -> tuple[AttachedEngine, EngineStatus]:
    cfg = SentinelConfig.model_validate(
        {
            "engine": {
                "mode": "attach",
                "attach": {"term_grace_s": 1.0, "recovery_holdoff_s": 60, **attach},
            },
            "supervisor": {"startup_timeout_s": 300},
        }
    )
    status = EngineStatus()
    status.new_generation()
    eng = AttachedEngine(
        cfg.engine, cfg.supervisor, status, discover_fn=engine.discovery, clock=clock
    )
    eng.apply(engine.discovery())
    return eng, status


def test_recovery_disallowed_only_reports(engine: Engine) -> None:
    eng, status = attached(engine, Clock(), recovery=False)
    status.mark_loaded()
    assert asyncio.run(eng.recover("stalled", "no tokens")) is False
    assert engine.alive()
    assert eng.refused == {"recovery_disabled": 1} and status.restart_counts == {}


def test_recovery_dumps_first_ends_processes_and_holds_off(engine: Engine) -> None:
    clock = Clock()
    eng, status = attached(engine, clock)
    status.mark_loaded()
    assert [p.pid for p in status.processes] == [p.pid for p in engine.procs]
    alive_at_dump: list[bool] = []

    async def hook(reason: str, detail: str) -> None:
        alive_at_dump.append(engine.alive())

    eng.before_hang_restart = hook
    old = [p.pid for p in engine.procs]
    assert asyncio.run(eng.recover("not_ready", "not ready for 300s")) is True
    assert alive_at_dump == [True]  # the dump came first, of live processes
    assert not engine.alive() and status.restart_counts == {"not_ready": 1}
    assert status.lifecycle == Lifecycle.restarting and status.processes == []
    # the kubelet restarts the container: new pids, a new generation, starting
    gen = status.generation
    engine.start()
    eng.apply(engine.discovery())
    assert status.generation == gen + 1 and status.lifecycle == Lifecycle.starting
    assert {p.pid for p in status.processes}.isdisjoint(old)
    # still starting: a stall is not acted on; once loaded, the holdoff still holds
    clock.now += 10
    assert asyncio.run(eng.recover("stalled", "")) is False and eng.refused == {"starting": 1}
    status.mark_loaded()
    assert asyncio.run(eng.recover("stalled", "")) is False and eng.refused["holdoff"] == 1
    assert engine.alive()
    clock.now += 61
    assert asyncio.run(eng.recover("stalled", "")) is True and not engine.alive()
    assert status.restart_counts == {"not_ready": 1, "stalled": 1}


def test_an_engine_that_never_loads_is_ended_once_after_the_grace(engine: Engine) -> None:
    clock = Clock()
    eng, status = attached(engine, clock, startup_grace_s=100, recovery_holdoff_s=30)
    clock.now += 99
    asyncio.run(eng._check_startup())
    assert engine.alive()
    clock.now += 2
    asyncio.run(eng._check_startup())
    assert not engine.alive() and status.restart_counts == {"startup_timeout": 1}
    engine.start()  # comes back, slow again: its own full grace, despite the holdoff ending
    eng.apply(engine.discovery())
    clock.now += 50
    asyncio.run(eng._check_startup())
    assert engine.alive() and status.restart_counts == {"startup_timeout": 1}


def test_nothing_found_nothing_ended_and_a_vanished_engine_is_counted(engine: Engine) -> None:
    eng, status = attached(engine, Clock())
    status.mark_loaded()
    for p in engine.procs:  # the engine dies on its own
        p.kill()
        p.wait()
    eng.apply(engine.discovery())
    assert status.lifecycle == Lifecycle.restarting
    assert status.restart_counts == {"crashed": 1}
    assert asyncio.run(eng.recover("stalled", "")) is False
    assert eng.refused == {"no_processes": 1}


def test_stop_exits_and_leaves_the_engine_running(engine: Engine) -> None:
    eng, status = attached(engine, Clock(), discover_interval_s=0.05)

    async def main() -> int:
        task = asyncio.create_task(eng.run())
        await asyncio.sleep(0.2)
        eng.request_stop()
        return await asyncio.wait_for(task, 5)

    assert asyncio.run(main()) == 0
    assert engine.alive() and status.lifecycle == Lifecycle.stopped
    assert eng.describe()["pids"]["api_server"] == [engine.procs[0].pid]


def test_a_held_back_recovery_is_done_once_allowed_unless_the_engine_is_fine(
    engine: Engine,
) -> None:
    clock = Clock()
    eng, status = attached(engine, clock)
    status.mark_loaded()
    assert asyncio.run(eng.recover("not_ready", "")) is True
    engine.start()
    eng.apply(engine.discovery())
    status.mark_loaded()
    clock.now += 10
    # hung again within the holdoff: the probes ask once; it is held back, not forgotten
    assert asyncio.run(eng.recover("stalled", "no tokens")) is False
    assert eng.describe()["pending"] == "stalled"
    asyncio.run(eng.retry_pending())
    assert engine.alive()
    clock.now += 51
    asyncio.run(eng.retry_pending())
    assert not engine.alive() and status.restart_counts == {"not_ready": 1, "stalled": 1}
    assert eng.describe()["pending"] is None
    # fine again by the time the holdoff ends: dropped
    engine.start()
    eng.apply(engine.discovery())
    status.mark_loaded()
    assert asyncio.run(eng.recover("stalled", "")) is False
    status.set_readiness(True, {})
    clock.now += 61
    asyncio.run(eng.retry_pending())
    assert engine.alive() and eng.describe()["pending"] is None
