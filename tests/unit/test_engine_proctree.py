"""Process-tree ownership with a fake engine: subreaper, reaping, killing orphans.

Each scenario runs in a child Python process so the test runner itself never
becomes a subreaper."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from sentinel.engine import proctree
from tests.helpers import fake_piddir

FAKE = Path(__file__).with_name("test_engine_fake.py")
ROOT = Path(__file__).resolve().parents[2]

SCENARIO = r"""
import asyncio, json, os, subprocess, sys, time
import psutil
from sentinel.engine import proctree

fake, mode = sys.argv[1], sys.argv[2]
out = {"subreaper": proctree.set_child_subreaper(), "me": os.getpid()}
leader = subprocess.Popen([sys.executable, fake, mode, "0"], start_new_session=True,
                          stdout=subprocess.DEVNULL)
tree = proctree.GenerationTree(1, leader.pid, psutil.Process(leader.pid).create_time())
deadline = time.time() + 30
while time.time() < deadline:  # while the API server lives: in orphan mode it exits
    # 1.5 s after its Worker took its title, so the three roles are seen first
    proctree.scan([tree], whole_system=False)
    if len({m.role for m in tree.members.values()}) == 3:
        break
    time.sleep(0.05)
out["roles"] = sorted(m.role for m in tree.members.values())
core = [m.pid for m in tree.members.values() if m.role == "engine_core"]
reaped = []
deadline = time.time() + 5
while time.time() < deadline and leader.pid not in [p for p, _ in reaped]:
    reaped += proctree.reap_children()
    time.sleep(0.05)
out["leader_code"] = dict(reaped).get(leader.pid)
leader.returncode = out["leader_code"]
proctree.scan([tree], whole_system=False)
orphans = [m.pid for m in tree.members.values()]
out["orphans"] = orphans
out["parents"] = {m.role: psutil.Process(m.pid).ppid() for m in tree.members.values()}
out["core"] = core
def find():
    proctree.scan([tree], whole_system=False)
    return list(tree.members.values())
report = asyncio.run(proctree.terminate(find, 1.0, lambda: reaped.extend(proctree.reap_children())))
out["report"] = {"termed": report.termed, "killed": report.killed, "survivors": report.survivors,
                 "seconds": report.seconds}
time.sleep(0.2)
reaped += proctree.reap_children()
out["reaped"] = [p for p, _ in reaped]
out["alive"] = [p for p in orphans if psutil.pid_exists(p)
                and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
out["zombie_children"] = [c.pid for c in psutil.Process().children()
                          if c.status() == psutil.STATUS_ZOMBIE]
print(json.dumps(out))
"""


def run_scenario(mode: str, tmp: Path) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", SCENARIO, str(FAKE), mode],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "FAKE_PIDDIR": str(fake_piddir(tmp))},
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_orphans_are_reparented_to_the_subreaper_then_killed_and_reaped(tmp_path: Path) -> None:
    out = run_scenario("orphan", tmp_path)
    assert out["subreaper"] is True
    assert out["leader_code"] == 3
    assert out["roles"] == ["api_server", "engine_core", "worker"]
    assert len(out["orphans"]) == 2, "EngineCore and Worker outlive their API server"
    # EngineCore is re-parented to the subreaper; the Worker stays under EngineCore
    assert out["parents"] == {"engine_core": out["me"], "worker": out["core"][0]}
    assert sorted(out["report"]["termed"]) == sorted(out["orphans"])
    assert out["report"]["survivors"] == []
    assert out["alive"] == []
    assert set(out["orphans"]) <= set(out["reaped"])
    assert out["zombie_children"] == []


def test_reap_children_returns_signal_as_negative_code() -> None:
    p = subprocess.Popen([sys.executable, "-c", "import os,signal; os.kill(os.getpid(), 9)"])
    deadline = time.time() + 10
    got: list[tuple[int, int]] = []
    while time.time() < deadline and p.pid not in dict(got):
        got += proctree.reap_children()
        time.sleep(0.02)
    p.returncode = dict(got)[p.pid]
    assert dict(got)[p.pid] == -9
    assert proctree.exit_code_for_shell(-9) == 137
    assert proctree.exit_code_for_shell(3) == 3


def test_a_reused_pid_is_not_ours() -> None:
    me = psutil.Process()
    tree = proctree.GenerationTree(1, leader_pid=me.pid, leader_ctime=me.create_time() + 100)
    # same pid as the "leader", different start time: a different process
    assert not tree.owns(me, me.create_time())
    tree2 = proctree.GenerationTree(2, leader_pid=1, leader_ctime=0.0)
    tree2.members[me.pid] = proctree.Member(me.pid, me.create_time() - 50, "worker", me)
    assert not tree2.owns(me, me.create_time())


def test_processes_older_than_the_generation_are_never_ours() -> None:
    me = psutil.Process()
    tree = proctree.GenerationTree(1, leader_pid=me.pid + 999999, leader_ctime=time.time() + 60)
    assert not tree.owns(me, me.create_time())


def test_role_from_process_title() -> None:
    assert proctree.role_from_cmdline(["VLLM::EngineCore"]) == "engine_core"
    assert proctree.role_from_cmdline(["VLLM::EngineCore_DP1"]) == "engine_core"
    assert proctree.role_from_cmdline(["VLLM::Worker_TP0"]) == "worker"
    assert proctree.role_from_cmdline(["python", "-m", "x"]) is None
    assert proctree.role_from_cmdline([]) is None


FORKING_CORE = r"""
import os, time
import setproctitle
setproctitle.setproctitle("VLLM::EngineCore")
if os.fork() == 0:  # a helper forked by the EngineCore: it carries the title until it execs
    time.sleep(30)
    os._exit(0)
time.sleep(30)
"""
API_SERVER = "import subprocess, sys; subprocess.run([sys.executable, '-c', sys.argv[1]])"


def test_a_fork_of_the_engine_core_that_carries_its_title_is_not_the_engine_core() -> None:
    """vLLM's EngineCore forks helpers (and its Workers) that carry its title until they
    exec or retitle: seen as an EngineCore, such a helper's exit failed a healthy
    generation ("EngineCore died while the API server was still up", seen in CI)."""
    leader = subprocess.Popen(
        [sys.executable, "-c", API_SERVER, FORKING_CORE], start_new_session=True
    )
    tree = proctree.GenerationTree(1, leader.pid, psutil.Process(leader.pid).create_time())
    try:
        deadline = time.time() + 20
        roles: dict[int, str] = {}
        while time.time() < deadline:
            proctree.scan([tree], whole_system=True)
            roles = {m.pid: m.role for m in tree.members.values()}
            if sorted(roles.values()) == ["api_server", "engine_core", "other"]:
                break
            time.sleep(0.05)
        assert sorted(roles.values()) == ["api_server", "engine_core", "other"], roles
        core = next(pid for pid, r in roles.items() if r == "engine_core")
        other = next(pid for pid, r in roles.items() if r == "other")
        assert psutil.Process(core).ppid() == leader.pid
        assert psutil.Process(other).ppid() == core
        assert proctree.role_from_cmdline(psutil.Process(other).cmdline()) == "engine_core"
    finally:
        for m in list(tree.members.values()):
            try:
                m.proc.kill()
            except psutil.Error:
                pass
        leader.wait()
