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
    # a pid file naming Sentinel itself (or its parent, or a child of it) is never taken
    for pid in (psutil.Process().pid, psutil.Process().ppid()):
        f.write_text(f"{pid}\n")
        found = discover(AttachConfig(pid_file=f), None)
        assert found.members == [] and "Sentinel's own" in (found.problem or "")


def test_attach_config_is_checked() -> None:
    with pytest.raises(ValidationError, match="http"):
        SentinelConfig.model_validate({"engine": {"attach": {"base_url": "127.0.0.1:8001"}}})
    with pytest.raises(ValidationError, match="non-empty"):
        SentinelConfig.model_validate({"engine": {"attach": {"api_server_match": [""]}}})
    for leaky in ("http://u:secret@127.0.0.1:8001", "http://127.0.0.1:8001/?token=secret"):
        with pytest.raises(ValidationError, match="credentials|query"):
            SentinelConfig.model_validate({"engine": {"attach": {"base_url": leaky}}})
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
            ],
            verified=True,
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


# ---- review of issue 18: never signal a process that is not the engine ---------------
GREP = ("pgrep", "-f", "vllm serve --port 8001")  # an operator's kubectl exec session


def test_sentinels_own_children_are_never_candidates_nor_members() -> None:
    # py-spy (or any helper) Sentinel (pid 50) runs, whose command line names vLLM
    sentinel = Proc(50, 1, 10.0, ("python", "-m", "sentinel", "run"))
    helper = Proc(51, 50, 11.0, ("/bin/sh", "-c", "py-spy dump -- vllm serve --port 8001"))
    d = select(procs(sentinel, helper), CFG, 8001, exclude={50, 1}, exclude_tree=50)
    assert d.api_server is not None and d.api_server.pid == 10 and d.problem is None
    # alone (the engine is down), Sentinel's child is still not taken
    lone = [Proc(1, 0, 1.0, ("/sbin/init",)), sentinel, helper]
    assert select(lone, CFG, 8001, exclude={50, 1}, exclude_tree=50).members == []
    # and a pid file naming one is refused
    d = select(lone, CFG, 8001, pid_from_file=51, exclude={50, 1}, exclude_tree=50)
    assert d.members == [] and "Sentinel's own" in (d.problem or "")


def test_only_the_tree_listening_on_the_port_is_taken_and_verified() -> None:
    grep = Proc(60, 1, 12.0, GREP)
    listening = {12}  # vLLM's API server or one of its children holds the socket

    def listens(pid: int) -> bool:
        return pid in listening

    # a match naming the port but not listening loses to the engine that listens
    d = select(procs(grep), CFG, 8001, listens=listens)
    assert d.api_server is not None and d.api_server.pid == 10 and d.verified
    assert d.problem is None
    # the engine is down: the lone match is a shell, not taken (it does not listen)
    down = [p for p in procs(grep) if p.pid not in (10, 11, 12, 13)]
    listening.clear()
    d = select(down, CFG, 8001, listens=listens)
    assert d.members == [] and not d.verified
    assert "60" in (d.problem or "") and "does not listen" in (d.problem or "")
    # without listens (no port check possible) the old rules hold, never verified
    assert not select(procs(), CFG, 8001).verified
    # sockets that cannot be read: taken for telemetry, not verified, and said so
    d = select(procs(), CFG, 8001, listens=lambda pid: None)
    assert d.api_server is not None and not d.verified and "no recovery" in (d.problem or "")


def test_a_pid_file_naming_a_process_off_the_port_is_not_verified() -> None:
    d = select(procs(), CFG, 8001, pid_from_file=20, listens=lambda pid: False)
    assert d.api_server is not None and d.api_server.pid == 20 and not d.verified
    assert "does not listen on port 8001" in (d.problem or "")
    d = select(procs(), CFG, 8001, pid_from_file=10, listens=lambda pid: pid == 11)
    assert d.verified and d.problem is None


def test_an_unverified_engine_is_never_signalled(engine: Engine) -> None:
    eng, status = attached(engine, Clock())
    status.mark_loaded()
    eng._discover = lambda: Discovery(members=engine.discovery().members, verified=False)
    eng.apply(eng._discover())
    for reason in ("stalled", "operator"):
        assert asyncio.run(eng.recover(reason, "")) is False
    assert engine.alive() and eng.refused == {"unverified": 2}
    assert status.restart_counts == {} and eng.describe()["verified"] is False


def test_an_engine_replaced_since_the_verdict_is_judged_afresh(engine: Engine) -> None:
    eng, status = attached(engine, Clock())
    status.mark_loaded()
    judged = list(engine.procs)
    # the kubelet restarted the container between the probes' verdict and the recovery
    for p in judged:
        p.kill()
        p.wait()
    engine.start()
    assert asyncio.run(eng.recover("stalled", "no tokens")) is False
    assert engine.alive() and eng.refused == {"engine_changed": 1}
    assert status.restart_counts == {"crashed": 1}  # the old one went away: counted once
    assert eng.describe()["pending"] is None


def test_a_recycled_pid_is_not_signalled(engine: Engine) -> None:
    eng, status = attached(engine, Clock())
    status.mark_loaded()
    real = engine.discovery()
    # the discovery saw pid P born at another time: P now is another process
    stale = [Found(m.pid, m.role, m.create_time - 5.0) for m in real.members]
    eng._discover = lambda: Discovery(members=stale, verified=True)
    eng.apply(eng._discover())
    assert asyncio.run(eng.recover("operator", "")) is True
    assert engine.alive()


def test_an_engine_that_cannot_be_told_apart_for_a_while_is_not_a_crash(
    engine: Engine,
) -> None:
    eng, status = attached(engine, Clock())
    status.mark_loaded()
    status.set_lifecycle(Lifecycle.running)
    gen, pids = status.generation, [p.pid for p in status.processes]
    ambiguous = Discovery(problem="2 processes match", candidates=[engine.procs[0].pid, 99])
    eng.apply(ambiguous)
    assert status.restart_counts == {} and status.generation == gen
    assert status.lifecycle == Lifecycle.running and [p.pid for p in status.processes] == pids
    assert eng.describe()["problem"] == "2 processes match"
    assert eng.owned_pids() == set(pids)  # telemetry and GPU memory keep their pids
    eng._discover = lambda: ambiguous
    assert asyncio.run(eng.recover("operator", "")) is False  # not one to signal now
    assert eng.refused == {"unverified": 1}
    assert engine.alive()
    eng.apply(engine.discovery())  # told apart again: the same engine, the same generation
    assert status.generation == gen and status.restart_counts == {}


def test_attach_mode_pids_reach_the_gpu_poller_by_role(engine: Engine) -> None:
    from sentinel.collectors.gpu.fake import FakeGpu, FakeNvml
    from sentinel.collectors.gpu.nvml import load_nvml
    from sentinel.collectors.gpu.poller import GpuPoller
    from sentinel.config.schema import GpuConfig

    eng, status = attached(engine, Clock())
    api, core = (p.pid for p in engine.procs)
    gpu = FakeGpu(compute_processes=[(api, 1 << 30), (core, 6 << 30), (4242, 2 << 30)])
    lib = FakeNvml([gpu])
    poller = GpuPoller(GpuConfig(), status, eng.owned_pids, load=lambda: load_nvml(lib))
    assert poller.open()
    try:
        [sample] = poller.poll_once().devices
    finally:
        poller.close()
    roles = {p.pid: p.role for p in sample.processes}
    assert roles == {api: "api_server", core: "engine_core", 4242: None}  # 4242: foreign


def test_attach_series_say_why_recoveries_were_refused(engine: Engine) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from sentinel.collectors.attach_metrics import REFUSALS, AttachCollector

    eng, status = attached(engine, Clock(), recovery=False)
    registry = CollectorRegistry()
    registry.register(AttachCollector(eng.describe))
    text = generate_latest(registry).decode()
    for why in REFUSALS:  # from 0, so increase() sees the first
        assert f'sentinel_attach_recoveries_refused_total{{why="{why}"}} 0.0' in text
    assert "sentinel_attach_engine_identified 1.0" in text
    assert "sentinel_attach_engine_verified 1.0" in text
    assert asyncio.run(eng.recover("stalled", "")) is False
    eng.apply(Discovery(problem="2 processes match"))  # the engine still runs: kept
    text = generate_latest(registry).decode()
    assert 'sentinel_attach_recoveries_refused_total{why="recovery_disabled"} 1.0' in text
    assert "sentinel_attach_discovery_problem 1.0" in text
    assert "sentinel_attach_engine_identified 1.0" in text  # still the same engine,
    assert "sentinel_attach_engine_verified 0.0" in text  # but not one to signal now


def test_sentinel_status_says_when_the_engine_is_not_one_to_signal(engine: Engine) -> None:
    from sentinel.cli.status import _attach_line

    eng, _ = attached(engine, Clock())
    assert "not verified" not in _attach_line(eng.describe())
    eng.apply(Discovery(members=engine.discovery().members, problem="sockets unreadable"))
    line = _attach_line(eng.describe())
    assert "not verified" in line and "sockets unreadable" in line


def test_the_engines_command_line_never_reaches_status(engine: Engine) -> None:
    # vLLM takes its key as --api-key: discovery reads command lines, publishes pids only
    keyed = Proc(30, 1, 7.0, ("vllm", "serve", "m", "--api-key", "s3cret-key-0123", "--port=1"))
    for d in (select(procs(keyed), CFG, 7777), select([keyed], CFG, 9)):
        assert d.problem is not None and "s3cret" not in d.problem
    eng, _ = attached(engine, Clock())
    eng.apply(select(procs(keyed), CFG, 7777))
    assert "s3cret" not in repr(eng.describe())


def test_an_engine_url_on_another_machine_finds_no_local_process() -> None:
    from sentinel.engine.discovery import is_local_host

    for local in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2", None):
        assert is_local_host(local), local
    for remote in ("10.255.255.254", "vllm.default.svc", "192.0.2.7"):
        assert not is_local_host(remote), remote
    # even when a local process would match and serve that port number
    d = discover(AttachConfig(api_server_match=["pytest"]), 8001, "192.0.2.7")
    assert d.members == [] and "192.0.2.7" in (d.problem or "")
    cfg = SentinelConfig.model_validate(
        {"engine": {"mode": "attach", "attach": {"base_url": "http://[::1]:8123"}}}
    )
    assert cfg.engine.attach_host() == "::1"


def test_attach_mode_reaps_no_child_of_anyone(engine: Engine) -> None:
    """waitpid(-1) would take exit statuses that belong to others (py-spy's caller, the
    harness): attach mode reaps nothing, during a recovery or on SIGCHLD."""
    import os
    import time

    other = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    while psutil.Process(other.pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    eng, status = attached(engine, Clock())
    status.mark_loaded()
    eng.notify_child_exit()
    assert asyncio.run(eng.recover("operator", "")) is True and not engine.alive()
    # still a zombie waiting for its own parent's wait(): nobody else took its status
    got = os.waitid(os.P_PID, other.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    assert got is not None and got.si_pid == other.pid
    assert other.wait() == 0
