"""`sentinel run -- <fake engine>`: the supervisor's behaviour, fast, without vLLM.

The real-engine proofs are in tests/real/test_supervisor.py; these cover the edge
cases (exit statuses, crash loop, zombies, PID 1, tini) in seconds."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from tests.helpers import fake_piddir, free_port, is_guard, json_records, live_fakes, wait_for

FAKE = Path(__file__).with_name("test_engine_fake.py")
ROOT = Path(__file__).resolve().parents[2]
TINI = shutil.which("tini") or "/usr/bin/tini"


class Run:
    def __init__(
        self,
        tmp: Path,
        mode: str,
        supervisor: dict[str, Any] | None = None,
        wrapper: list[str] | None = None,
    ) -> None:
        self.port = free_port()
        self.piddir = fake_piddir(tmp)  # each fake process registers itself here
        env = {"FAKE_TAG": str(self.port), "FAKE_PIDDIR": str(self.piddir)}
        cfg = {
            "engine": {"port": self.port, "env": env},
            "supervisor": {
                "backoff_initial_s": 0.2,
                "backoff_max_s": 1.0,
                "stop_grace_s": 5.0,
                "kill_grace_s": 0.5,
                **(supervisor or {}),
            },
            "ops": {"host": "127.0.0.1", "port": 0},
            "proxy": {"host": "127.0.0.1", "port": 0, "enabled": False},
            "payload_log": {"enabled": False, "dir": str(tmp / "payloads")},
            "gpu": {"mode": "off"},
            "logging": {"format": "json"},
            "lifecycle": {"runtime_dir": str(tmp / "run")},
        }
        path = tmp / "sentinel.yaml"
        path.write_text(yaml.safe_dump(cfg))
        self.log_path = tmp / "sentinel.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        cmd = [
            *(wrapper or []),
            sys.executable,
            "-m",
            "sentinel",
            "run",
            "--config",
            str(path),
            "--",
            sys.executable,
            str(FAKE),
            mode,
            str(self.port),
        ]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        _RUNS.append(self)

    def records(self) -> list[dict[str, Any]]:
        return json_records(self.log_path)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("event") == name]

    def fakes(self) -> list[psutil.Process]:
        """Every live fake-engine process of this run anywhere on the machine (orphans too)."""
        return live_fakes(str(self.port), self.piddir)

    def wait_started(self, generation: int = 1, timeout: float = 60) -> dict[str, Any]:
        return wait_for(
            lambda: next(
                (r for r in self.events("engine loaded") if r["generation"] == generation), None
            ),
            timeout,
            what=f"generation {generation} loaded\n{self.tail()}",
        )

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()


_RUNS: list[Run] = []


@pytest.fixture(autouse=True)
def _no_leftovers() -> Iterator[None]:
    """No Sentinel or fake engine survives a test; a fake that outlived a Sentinel which
    exited on its own (run.stop()) fails the test, as in tests/real."""
    yield
    leaks = []
    while _RUNS:
        run = _RUNS.pop()
        exited = run.proc.poll() is not None
        if not exited:  # the test failed before stopping it: clean up, blame nothing more
            run.proc.kill()
            run.proc.wait(10)
        for p in run.fakes():
            if exited:
                with contextlib.suppress(psutil.Error):
                    leaks.append((p.pid, p.name()))
            with contextlib.suppress(psutil.Error):
                p.kill()
        run._log.close()
    assert not leaks, f"fake engine processes outlived their Sentinel: {leaks}"


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.fixture(autouse=True)
def _tag_fakes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")


def engine_pids(run: Run) -> list[int]:
    try:
        return [
            c.pid
            for c in psutil.Process(run.proc.pid).children(recursive=True)
            if _alive(c) and not is_guard(c)
        ]
    except psutil.NoSuchProcess:
        return []


def test_sigterm_stops_the_tree_and_exits_with_the_engine_status(tmp_path: Path) -> None:
    run = Run(tmp_path, "serve")
    run.wait_started()
    wait_for(lambda: len(engine_pids(run)) == 3, 30, what="3 engine processes")
    # every process's output is captured with its role (the Worker speaks last)
    all_roles = {"api_server", "engine_core", "worker"}
    wait_for(
        lambda: all_roles <= {r["role"] for r in run.events("engine")},
        30,
        what="log lines of all three roles",
    )
    pids = engine_pids(run)
    code = run.stop()
    assert code == 0, run.tail()  # the fake API server exits 0 on SIGTERM
    assert not [p for p in pids if psutil.pid_exists(p) and _alive(psutil.Process(p))]
    assert run.events("sentinel exiting")[0]["exit_code"] == 0
    assert run.fakes() == []


def test_an_engine_ignoring_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    run = Run(tmp_path, "ignore_term", {"stop_grace_s": 1.0})
    run.wait_started()
    t0 = time.monotonic()
    code = run.stop()
    took = time.monotonic() - t0
    assert code == 128 + signal.SIGKILL, run.tail()
    assert 1.0 <= took < 8.0


def test_orphans_of_a_dead_api_server_are_killed_and_the_engine_restarted(tmp_path: Path) -> None:
    run = Run(tmp_path, "orphan", {"crash_loop_max_starts": 10})
    wait_for(lambda: len(run.events("engine started")) >= 2, 20, what="a restart")
    ended = wait_for(
        lambda: next(
            (r for r in run.events("engine generation terminated") if r["generation"] == 1), None
        ),
        10,
        what="cleanup",
    )
    assert not ended["api_server_was_alive"]
    assert len(ended["termed"]) == 2  # EngineCore and Worker, re-parented to Sentinel
    for pid in ended["termed"]:
        assert not (psutil.pid_exists(pid) and _alive(psutil.Process(pid)))
    exited = [r for r in run.events("engine exited") if r["generation"] == 1][0]
    assert exited["reason"] == "crashed" and "status 3" in exited["cause"]
    run.stop()


def test_crash_loop_ends_in_failed_and_exits_1(tmp_path: Path) -> None:
    run = Run(tmp_path, "crash", {"crash_loop_max_starts": 3, "on_failed": "exit"})
    code = run.proc.wait(30)
    run.stop()
    assert code == 1, run.tail()
    assert len(run.events("engine started")) == 3
    failed = run.events("engine failed")
    assert len(failed) == 1
    assert failed[0]["state"] == "failed"
    assert "crash loop: 3 starts" in failed[0]["reason"]
    assert "No module named 'fakepkg'" in failed[0]["reason"]
    exits = run.events("engine exited")
    assert {e["reason"] for e in exits} == {"missing_module"}
    assert any("ModuleNotFoundError" in line for line in exits[0]["log_tail"])
    assert run.fakes() == []


def test_failed_with_on_failed_stay_keeps_running_and_sighup_revives(tmp_path: Path) -> None:
    run = Run(tmp_path, "crash", {"crash_loop_max_starts": 2, "on_failed": "stay"})
    wait_for(lambda: run.events("engine failed"), 20, what="failed")
    time.sleep(1.0)
    assert run.proc.poll() is None
    assert len(run.events("engine started")) == 2, "no spinning once failed"
    run.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: len(run.events("engine started")) >= 3, 10, what="revived by SIGHUP")
    wait_for(lambda: len(run.events("engine failed")) >= 2, 20, what="failed again")
    assert run.stop() == 1  # stopped while failed


def test_reparented_zombies_are_reaped(tmp_path: Path) -> None:
    run = Run(tmp_path, "zombies")
    run.wait_started()
    time.sleep(1.5)  # the grandchildren exit after 0.3 s, re-parented to Sentinel

    def zombies() -> list[int]:
        return [
            c.pid
            for c in psutil.Process(run.proc.pid).children()
            if c.status() == psutil.STATUS_ZOMBIE
        ]

    assert zombies() == []
    assert len(engine_pids(run)) == 3
    assert run.stop() == 0


def test_sighup_replaces_the_whole_tree(tmp_path: Path) -> None:
    run = Run(tmp_path, "serve")
    run.wait_started()
    wait_for(lambda: len(engine_pids(run)) == 3, 30, what="3 engine processes")
    old = set(engine_pids(run))
    run.proc.send_signal(signal.SIGHUP)
    run.wait_started(generation=2)
    wait_for(lambda: len(engine_pids(run)) == 3, 30, what="3 new engine processes")
    assert not old & set(engine_pids(run))
    assert all(not psutil.pid_exists(p) for p in old)
    assert run.stop() == 0


def test_engine_core_death_replaces_the_generation(tmp_path: Path) -> None:
    run = Run(tmp_path, "serve", {"crash_loop_max_starts": 10})
    run.wait_started()
    core = wait_for(
        lambda: next(
            (
                c
                for c in psutil.Process(run.proc.pid).children(True)
                if "EngineCore" in " ".join(c.cmdline())
            ),
            None,
        ),
        10,
        what="EngineCore",
    )
    old = set(engine_pids(run))
    t0 = time.monotonic()
    core.kill()
    wait_for(
        lambda: not (old & set(engine_pids(run))), 5, interval=0.02, what="the old generation gone"
    )
    assert time.monotonic() - t0 < 3.0
    run.wait_started(generation=2)
    exited = [r for r in run.events("engine exited") if r["generation"] == 1][0]
    assert exited["reason"] == "engine_core_died"
    assert run.stop() == 0


def test_a_generation_that_never_loads_is_replaced_after_the_startup_timeout(
    tmp_path: Path,
) -> None:
    run = Run(tmp_path, "hang", {"startup_timeout_s": 1.5, "crash_loop_max_starts": 10})
    wait_for(lambda: len(run.events("engine started")) >= 2, 30, what="a second generation")
    exited = [r for r in run.events("engine exited") if r["generation"] == 1][0]
    assert exited["reason"] == "startup_timeout"
    assert "did not load its model within 1.5s" in exited["cause"]
    ended = [r for r in run.events("engine generation terminated") if r["generation"] == 1][0]
    assert ended["api_server_was_alive"] is True and len(ended["termed"]) == 3
    code = run.stop()
    # the newest generation may be stopped before its SIGTERM handler is installed: 143
    assert code == run.events("sentinel exiting")[0]["exit_code"] and code in (0, 143)


@pytest.mark.skipif(not os.path.exists(TINI), reason="tini not installed")
def test_under_tini(tmp_path: Path) -> None:
    run = Run(tmp_path, "orphan", {"crash_loop_max_starts": 10}, wrapper=[TINI, "--"])
    wait_for(lambda: len(run.events("engine started")) >= 2, 20, what="a restart under tini")
    ended = [r for r in run.events("engine generation terminated") if r["generation"] == 1]
    assert ended and len(ended[0]["termed"]) == 2
    code = run.stop()
    # tini passes Sentinel's status through: the engine's, 143 if SIGTERM ended it early
    assert code == run.events("sentinel exiting")[0]["exit_code"] and code in (0, 143)
    assert run.fakes() == []


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare"),
    reason="needs root and unshare for a PID namespace",
)
def test_as_pid_1(tmp_path: Path) -> None:
    run = Run(
        tmp_path,
        "orphan",
        {"crash_loop_max_starts": 10},
        wrapper=["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"],
    )
    wait_for(lambda: len(run.events("engine started")) >= 2, 30, what="a restart as PID 1")
    started = run.events("supervisor started")[0]
    assert started["pid1"] is True and started["pid"] == 1
    ended = [r for r in run.events("engine generation terminated") if r["generation"] == 1]
    assert ended and len(ended[0]["termed"]) == 2
    # signal Sentinel (PID 1 inside the namespace) from outside
    sentinel = psutil.Process(run.proc.pid).children()[0]
    sentinel.send_signal(signal.SIGTERM)
    code = run.proc.wait(20)
    assert code == run.events("sentinel exiting")[0]["exit_code"] and code in (0, 143)
    run.stop()
    assert run.events("sentinel exiting")
