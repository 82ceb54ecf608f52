"""The ops port's CPU per request: the working tree against an earlier revision (e.g. the
one that served it with uvicorn), side by side in one run, rounds alternating.

    .venv/bin/python -m bench.ops_cpu --base main [--rounds 4] [--livez 2000] [--metrics 300]

Each side is the ops stack of its tree (``build_ops_stack``: registry, collectors, the
ops app and its server on port 0; no engine, probes off) in its own process on uvloop,
as in ``sentinel run``, pinned to core 0; the client runs on core 1. Per round and side:
``--livez`` GETs of /livez, each on a new connection (as the kubelet probes), as many on
one keep-alive connection, then ``--metrics`` GETs of /metrics on one keep-alive
connection (as Prometheus scrapes).
Printed: CPU microseconds (user + system of the server's process) per request, each
round's and the medians, and the ratio new / base.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import psutil

from bench import proxy as bp

# runs in either tree: only names both have
SERVER = """
import asyncio, os, sys, uvloop
from sentinel.config import SentinelConfig
from sentinel.ops.metrics import SentinelRegistry
from sentinel.ops.stack import build_ops_stack
from sentinel.state import EngineStatus

os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

class Control:
    engine_base_url = "http://127.0.0.1:9"
    def request_restart(self, reason, detail=""):
        pass

async def main():
    cfg = SentinelConfig.model_validate({"ops": {"host": "127.0.0.1", "port": 0}})
    stack = build_ops_stack(cfg, EngineStatus(), SentinelRegistry(), Control())
    stack.server.bind()
    tasks = []
    for coro, name in stack.tasks():
        if name == "probes":
            coro.close()
        else:
            tasks.append(asyncio.create_task(coro))
    print(stack.server.port, flush=True)
    await asyncio.gather(*tasks)

uvloop.run(main())
"""


def _server(tree: Path) -> tuple[subprocess.Popen[str], int]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    p = subprocess.Popen(
        [sys.executable, "-c", SERVER], cwd=tree, env=env, stdout=subprocess.PIPE, text=True
    )
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line.strip().isdigit():
        p.kill()
        raise RuntimeError(f"the ops server of {tree} did not start: {line!r}")
    return p, int(line)


def _cpu(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def _measure(port: int, pid: int, livez: int, metrics: int) -> tuple[float, float, float]:
    """CPU microseconds per /livez (new connection each; then keep-alive) and per
    /metrics (keep-alive)."""
    url = f"http://127.0.0.1:{port}"
    c0 = _cpu(pid)
    for _ in range(livez):
        with httpx.Client(trust_env=False) as c:
            assert c.get(url + "/livez").status_code == 200
    c1 = _cpu(pid)
    with httpx.Client(trust_env=False) as c:
        for _ in range(livez):
            assert c.get(url + "/livez").status_code == 200
    c2 = _cpu(pid)
    with httpx.Client(trust_env=False) as c:
        for _ in range(metrics):
            assert c.get(url + "/metrics").status_code == 200
    c3 = _cpu(pid)
    return (c1 - c0) / livez * 1e6, (c2 - c1) / livez * 1e6, (c3 - c2) / metrics * 1e6


def _line(m: tuple[float, ...]) -> str:
    return (
        f"{m[0]:5.0f} us per /livez (new connection), {m[1]:4.0f} us per /livez "
        f"(keep-alive), {m[2]:5.0f} us per /metrics"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--base", required=True, help="git revision to compare with (e.g. main)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--livez", type=int, default=2000)
    ap.add_argument("--metrics", type=int, default=300)
    a = ap.parse_args()
    base_dir = Path(tempfile.mkdtemp(prefix="sentinel-base-"))
    subprocess.run(
        ["git", "worktree", "add", "--detach", "-f", str(base_dir), a.base],
        cwd=bp.ROOT,
        check=True,
        capture_output=True,
    )
    procs: list[subprocess.Popen[str]] = []
    try:
        sides = {"base": _server(base_dir), "new": _server(bp.ROOT)}
        procs += [p for p, _ in sides.values()]
        bp.pin([1])
        got: dict[str, list[tuple[float, float, float]]] = {name: [] for name in sides}
        for p, port in sides.values():  # warm-up
            _measure(port, p.pid, 100, 20)
        for rnd in range(a.rounds):
            for name, (p, port) in sides.items():
                got[name].append(_measure(port, p.pid, a.livez, a.metrics))
                print(f"round {rnd} {name:4s}: " + _line(got[name][-1]), flush=True)
        med = {
            name: tuple(statistics.median(x) for x in zip(*xs, strict=True))
            for name, xs in got.items()
        }
        for name, m in med.items():
            print(f"median {name:4s}: " + _line(m))
        ratios = [n / b for n, b in zip(med["new"], med["base"], strict=True)]
        print(
            f"new / base ({a.base}): /livez {ratios[0]:.2f} (new connections), "
            f"{ratios[1]:.2f} (keep-alive), /metrics {ratios[2]:.2f}"
        )
    finally:
        for proc in procs:
            bp._stop(proc)
        subprocess.run(
            ["git", "worktree", "remove", "--force", str(base_dir)],
            cwd=bp.ROOT,
            capture_output=True,
        )


if __name__ == "__main__":
    main()
