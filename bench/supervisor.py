"""Supervisor benchmark against the real vLLM engine (CPU, tiny model).

Measures, over several runs:
  - recovery after SIGKILL of the API server: time until no process of the old
    generation is left (goal <= 2 s) and until the new engine serves again;
  - Sentinel's own RSS (goal <= 80 MB) and CPU (goal <= 1% of one core) while it
    supervises an idle engine, side by side with the engine's own RSS and CPU.

Usage: .venv/bin/python -m bench.supervisor [--runs 3] [--idle-s 30]
"""

from __future__ import annotations

import argparse
import signal
import statistics
import tempfile
import time
from pathlib import Path

import psutil

from bench.common import SentinelRun, engine_available, role_of


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _tree(s: SentinelRun) -> list[psutil.Process]:
    return [p for p in s.engine_tree() if _alive(p.pid)]


def _full_tree(s: SentinelRun, timeout: float = 60) -> dict[str, list[int]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        roles: dict[str, list[int]] = {}
        for p in _tree(s):
            try:
                roles.setdefault(role_of(p), []).append(p.pid)
            except psutil.Error:
                continue
        if all(roles.get(r) for r in ("api_server", "engine_core", "worker")):
            return roles
        time.sleep(0.2)
    raise RuntimeError("the engine tree did not come up")


def recovery_run(s: SentinelRun) -> tuple[float, float]:
    roles = _full_tree(s)
    old = [pid for pids in roles.values() for pid in pids]
    t0 = time.monotonic()
    psutil.Process(roles["api_server"][0]).kill()
    while any(_alive(pid) for pid in old):
        if time.monotonic() - t0 > 30:
            raise RuntimeError(f"old generation still alive: {[p for p in old if _alive(p)]}")
        time.sleep(0.005)
    orphans_gone = time.monotonic() - t0
    while not s.serves():
        if time.monotonic() - t0 > 600:
            raise RuntimeError("the engine did not serve again")
        time.sleep(0.25)
    return orphans_gone, time.monotonic() - t0


def _cpu_s(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            continue
    return total


def _rss(procs: list[psutil.Process]) -> int:
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


def idle_usage(s: SentinelRun, seconds: float) -> dict[str, float]:
    me = psutil.Process(s.sentinel_pid())
    engine = _tree(s)
    c0_me, c0_eng, t0 = _cpu_s([me]), _cpu_s(engine), time.monotonic()
    rss_me: list[int] = []
    while time.monotonic() - t0 < seconds:
        rss_me.append(me.memory_info().rss)
        time.sleep(1.0)
    wall = time.monotonic() - t0
    return {
        "sentinel_cpu_pct": 100 * (_cpu_s([me]) - c0_me) / wall,
        "engine_cpu_pct": 100 * (_cpu_s(engine) - c0_eng) / wall,
        "sentinel_rss_mb": max(rss_me) / 2**20,
        "engine_rss_mb": _rss(engine) / 2**20,
        "seconds": wall,
    }


def _fmt(values: list[float]) -> str:
    return f"p50 {statistics.median(values):.3f}s  max {max(values):.3f}s"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--idle-s", type=float, default=30.0)
    args = ap.parse_args()
    if not engine_available():
        print("real vLLM or var/tiny-model missing: run `make setup`")
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-supervisor-") as tmp:
        s = SentinelRun(
            Path(tmp),
            {
                "supervisor": {"crash_loop_max_starts": 100, "backoff_initial_s": 0.5},
                # the default probe cadence, as a deployment would run it
                "probes": {"interval_s": 2.0, "timeout_s": 3.0, "freshness_s": 10.0},
            },
        ).start()
        try:
            t0 = time.monotonic()
            s.wait_serving()
            print(f"first start: serving after {time.monotonic() - t0:.1f}s")
            time.sleep(5)  # let start-up work settle
            idle = idle_usage(s, args.idle_s)
            print(
                f"\nidle supervision over {idle['seconds']:.0f}s "
                "(Sentinel = whole process: supervisor, probes, ops, proxy):"
            )
            print(f"  {'':10} {'RSS MB':>8} {'CPU % of a core':>16}")
            print(
                f"  {'sentinel':10} {idle['sentinel_rss_mb']:8.1f} "
                f"{idle['sentinel_cpu_pct']:16.2f}   goals: <= 80 MB, <= 1%"
            )
            print(f"  {'engine':10} {idle['engine_rss_mb']:8.1f} {idle['engine_cpu_pct']:16.2f}")
            rss_ratio = idle["sentinel_rss_mb"] / idle["engine_rss_mb"]
            cpu_ratio = idle["sentinel_cpu_pct"] / max(idle["engine_cpu_pct"], 1e-9)
            print(f"  ratio sentinel/engine: RSS {rss_ratio:.3f}  CPU {cpu_ratio:.3f}")
            gone, ready = [], []
            print(f"\nSIGKILL of the API server, {args.runs} runs:")
            for i in range(args.runs):
                g, r = recovery_run(s)
                gone.append(g)
                ready.append(r)
                print(f"  run {i + 1}: no orphan left after {g:.3f}s, serving again after {r:.1f}s")
            print(f"  orphans gone: {_fmt(gone)}   (goal <= 2 s)")
            print(f"  ready again:  {_fmt(ready)}")
            engine = s.engine_tree()
            t0 = time.monotonic()
            code = s.stop(signal.SIGTERM)
            left = [p for p in engine if _alive(p.pid)]
            print(
                f"\nSIGTERM: Sentinel exited {code} after {time.monotonic() - t0:.2f}s; "
                f"engine processes left: {len(left)}"
            )
        finally:
            s.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
