"""GPU processes after a generation ends: Sentinel's own earlier-generation holders are
killed, processes it did not start are reported and left alone (unless configured).

Runs the Supervisor in a child Python process (it becomes a subreaper) with a fake
engine and a fake GPU process lister."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import fake_piddir, free_port

FAKE = Path(__file__).with_name("test_engine_fake.py")
ROOT = Path(__file__).resolve().parents[2]

SCENARIO = r"""
import asyncio, io, json, os, signal, subprocess, sys, time
import psutil
from sentinel.config.schema import EngineConfig, LoggingConfig, SupervisorConfig
from sentinel.engine.supervisor import Supervisor
from sentinel.logs import configure_logging
from sentinel.state import EngineStatus

fake, port, kill_foreign = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
logs = io.StringIO()
configure_logging(LoggingConfig(format="json"), stream=logs)
# a process Sentinel's engine did not start, "holding GPU memory"
foreign = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
gpu_rows = [(foreign.pid, 0, 123 << 20)]
eng = EngineConfig(port=port, command=[sys.executable, fake, "serve", str(port)],
                   env={"FAKE_PIDDIR": os.environ["FAKE_PIDDIR"]})
sup = Supervisor(eng, SupervisorConfig(kill_grace_s=0.3, kill_foreign_gpu_processes=kill_foreign,
                                       backoff_initial_s=0.1),
                 EngineStatus(), gpu_processes=lambda: list(gpu_rows), engine_lines=False)

async def main():
    task = asyncio.create_task(sup.run())
    while not sup.status.loaded:
        await asyncio.sleep(0.05)
    sup.request_restart("sighup")
    while sup.status.generation < 2 or not sup.status.loaded:
        await asyncio.sleep(0.05)
    sup.request_stop(signal.SIGTERM)
    return await task

code = asyncio.run(main())
alive = foreign.poll() is None
foreign.kill(); foreign.wait()
events = [json.loads(l) for l in logs.getvalue().splitlines() if l.startswith("{")]
print(json.dumps({"code": code, "foreign_alive": alive,
                  "events": [e["event"] for e in events]}))
"""


@pytest.mark.parametrize("kill_foreign", [False, True])
def test_foreign_gpu_processes_are_reported_not_killed(kill_foreign: bool, tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-c", SCENARIO, str(FAKE), str(free_port()), "1" if kill_foreign else "0"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "FAKE_PIDDIR": str(fake_piddir(tmp_path))},
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["code"] == 0
    reported = [e for e in out["events"] if "not started by Sentinel" in e]
    killed = [e for e in out["events"] if "did not start" in e]
    if kill_foreign:
        assert not out["foreign_alive"] and killed
    else:
        assert out["foreign_alive"], "a process Sentinel did not start must never be killed"
        assert len(reported) == 1, out["events"]  # reported once, not at every generation end
        assert not killed
