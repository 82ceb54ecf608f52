"""The proxy's CPU per request: the working tree against an earlier revision, side by
side in one run (CPU time is steadier than latency on a shared VM, but the VM's speed
still drifts, so the two alternate round by round).

    .venv/bin/python -m bench.proxy_cpu --base HEAD~1 [--rounds 4] [--no-payloads]

Both proxies (``bench.proxy --role proxy``, payload log on unless ``--no-payloads``,
as ``bench.relay_floor`` runs Sentinel) are pinned to core 0; the
upstream and the load generator to core 1. Per round and side: whole answers at 1 500
req/s over 64 connections for 2 s, then 384 streams (32 events each, 64 at a time,
starts 10 ms apart, as in ``bench.proxy``). Printed: CPU microseconds (user + system,
the proxy process) per whole request and per stream, each round's and the medians,
and the ratio new / base.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
from pathlib import Path

import psutil

from bench import proxy as bp

WHOLE = {"model": "bench", "prompt": "hi", "max_tokens": 2}
STREAM = {"model": "bench", "prompt": "hi", "max_tokens": 32, "stream": True}


def _proxy(
    root: Path, upstream_port: int, payloads: bool = True
) -> tuple[subprocess.Popen[str], int]:
    """The proxy of the tree at ``root``, and its port."""
    port = bp.free_port()
    pdir = tempfile.mkdtemp() if payloads else "off"
    args = ["--role", "proxy", "--port", str(port), "--payload-dir", pdir]
    args += ["--upstream", f"http://127.0.0.1:{upstream_port}"]
    return bp._spawn(args, [0], tree=root), port


async def _measure(port: int, pid: int) -> tuple[float, float]:
    """CPU microseconds per whole request and per stream, one pass."""
    proc = psutil.Process(pid)
    out = []
    for kw in (
        {"body": WHOLE, "duration": 2.0, "requests": None, "rate": 1500},
        {"body": STREAM, "duration": None, "requests": 384, "stagger": 32 * 0.02 / 64},
    ):
        t0 = proc.cpu_times()
        r = await bp._load(port, 64, **kw)  # type: ignore[arg-type]
        t1 = proc.cpu_times()
        cpu = t1.user + t1.system - t0.user - t0.system
        out.append(cpu / r["n"] * 1e6 if r["n"] else float("nan"))
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--base", required=True, help="git revision to compare with (e.g. HEAD~1)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--no-payloads", action="store_true", help="payload log off on both sides")
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
        up = bp.free_port()
        procs.append(bp._spawn(["--role", "upstream", "--port", str(up)], [1]))
        logs = not a.no_payloads
        sides = {"base": _proxy(base_dir, up, logs), "new": _proxy(bp.ROOT, up, logs)}
        procs += [p for p, _ in sides.values()]
        bp.pin([1])
        got: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}

        async def go() -> None:
            for _, port in sides.values():  # warm-up: connections, imports, caches
                await bp._load(port, 64, None, 0.5, WHOLE, rate=1500)
            for rnd in range(a.rounds):
                for name, (p, port) in sides.items():
                    whole, stream = await _measure(port, p.pid)
                    got[name].append((whole, stream))
                    print(
                        f"round {rnd} {name:4s}: {whole:5.0f} us per whole request, "
                        f"{stream:6.0f} us per stream",
                        flush=True,
                    )

        bp.new_loop().run_until_complete(go())
        med = {
            name: (statistics.median(w for w, _ in xs), statistics.median(s for _, s in xs))
            for name, xs in got.items()
        }
        for name, (w, s) in med.items():
            print(f"median {name:4s}: {w:5.0f} us per whole request, {s:6.0f} us per stream")
        (bw, bs), (nw, ns) = med["base"], med["new"]
        print(f"new / base ({a.base}): whole requests {nw / bw:.2f}, streams {ns / bs:.2f}")
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
