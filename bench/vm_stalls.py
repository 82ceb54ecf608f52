"""How long this machine stops a process that is pinned to one core and barely busy:
the floor under every tail latency measured on it.

    .venv/bin/python -m bench.vm_stalls [--core 0] [--seconds 8] [--duty 0.05 0.55]

A 1 ms ticker on ``--core``: in each millisecond it spins for ``duty`` of it (a proxy's
share of its core), then sleeps to the next. Printed per duty: how late the ticks
came (p50, p99, max), how many were over 5 ms late, and the share of the core's time
the hypervisor stole meanwhile (/proc/stat). No I/O, no Python beyond the loop: a
tick that is late by tens of milliseconds is the virtual machine, not the code under
test. Run it beside ``bench.proxy`` to read that benchmark's tails.
"""

from __future__ import annotations

import argparse
import os
import time

from bench import common


def ticker(core: int, seconds: float, duty: float) -> dict[str, float]:
    os.sched_setaffinity(0, [core])
    lags: list[float] = []
    steal0 = common.steal_s(core)
    start = time.perf_counter()
    due = start
    while (now := time.perf_counter()) < start + seconds:
        lags.append(now - due)
        busy_until = now + duty * 0.001
        while time.perf_counter() < busy_until:
            pass
        due += 0.001
        pause = due - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        else:  # behind: the next tick is due now, not in a catch-up burst
            due = time.perf_counter()
    stolen = common.steal_s(core) - steal0
    return {
        "steal_share": stolen / seconds,
        "lag_p50_ms": common.pct(lags, 0.50) * 1e3,
        "lag_p99_ms": common.pct(lags, 0.99) * 1e3,
        "lag_max_ms": max(lags) * 1e3,
        "late_over_5ms": float(sum(1 for x in lags if x > 0.005)),
        "ticks": float(len(lags)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--core", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--duty", type=float, nargs="+", default=[0.05, 0.55])
    a = ap.parse_args()
    for duty in a.duty:
        r = ticker(a.core, a.seconds, duty)
        print(
            f"core {a.core}, busy {duty:.0%}: stolen {r['steal_share']:.1%}; tick lag p50 "
            f"{r['lag_p50_ms']:.3f} ms, p99 {r['lag_p99_ms']:.3f} ms, max "
            f"{r['lag_max_ms']:.1f} ms; {r['late_over_5ms']:.0f} of {r['ticks']:.0f} "
            "ticks over 5 ms late",
            flush=True,
        )


if __name__ == "__main__":
    main()
