"""The proxy's user-space instructions per request (valgrind's callgrind), the working
tree against an earlier revision and the byte-pipe floor: a figure a shared VM cannot
distort (CPU time there drifts by a third between rounds; instructions do not).

    .venv/bin/python -m bench.proxy_instructions --base HEAD~1
    .venv/bin/python -m bench.proxy_instructions --syscalls

Each relay runs under callgrind (payload log off, as in ``bench.relay_floor``); after a
warm-up its counters are zeroed, a fixed load runs (400 whole answers, then 64 streams
of 33 events, 8 at a time, each load opening its 8 connections first), and the
counters are dumped: instructions per request. Kernel work (the system calls, the TCP
stack) is not counted: the floor's CPU time is mostly that, so the ratio to the floor
here is far larger than the CPU-time ratio (``bench.relay_floor``); use this to see
what a change to the proxy's own code does, side by side.

``--syscalls`` gives the kernel's half: the same loads with each relay under
``strace -c -f`` (the working tree and the byte pipe), printed as system calls per
request by name. Where Sentinel makes the same calls as the byte pipe, the whole gap in
CPU time between them is user space, which the instruction counts measure.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import proxy as bp

WHOLE = {"model": "bench", "prompt": "hi", "max_tokens": 2}
STREAM = {"model": "bench", "prompt": "hi", "max_tokens": 32, "stream": True}
LOADS = (("whole", WHOLE, 400), ("stream", STREAM, 64))
CONCURRENCY = 8


def _relay_cmd(kind: str, port: int, up: int) -> list[str]:
    if kind == "bytepipe":
        role = ["bench.relay_floor", "--role", "bytepipe", "--upstream-port", str(up)]
        return [sys.executable, "-m", *role, "--port", str(port)]
    args = ["--role", "proxy", "--port", str(port), "--payload-dir", "off", "--cores", "0"]
    return [sys.executable, "-m", "bench.proxy", *args, "--upstream", f"http://127.0.0.1:{up}"]


def _last_total(out: Path, pid: int) -> int:
    dumps = sorted(glob.glob(f"{out}/cg.{pid}.*"), key=os.path.getmtime)
    with open(dumps[-1]) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError(f"no totals in {dumps[-1]}")


def measure(kind: str, tree: Path, up: int) -> dict[str, float]:
    """Instructions per request of one relay, per load."""
    out = Path(tempfile.mkdtemp(prefix="sentinel-cg-"))
    port = bp.free_port()
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/cg.%p"]
    p = subprocess.Popen(
        [*cmd, *_relay_cmd(kind, port, up)],
        cwd=tree,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"

        def ctl(flag: str) -> None:
            subprocess.run(["callgrind_control", flag, str(p.pid)], capture_output=True, check=True)

        async def go() -> dict[str, float]:
            got = {}
            await bp._load(port, CONCURRENCY, 16, None, STREAM)  # warm-up
            await bp._load(port, CONCURRENCY, 64, None, WHOLE)
            for name, body, n in LOADS:
                ctl("-z")
                r = await bp._load(port, CONCURRENCY, n, None, body)
                ctl("-d")
                await asyncio.sleep(0.5)
                assert r["errors"] == 0, r["errors"]
                got[name] = _last_total(out, p.pid) / (r["n"] + CONCURRENCY)  # + warm-up
            return got

        return bp.new_loop().run_until_complete(go())
    finally:
        bp._stop(p)
        shutil.rmtree(out, ignore_errors=True)


def syscalls(kind: str, up: int) -> dict[str, dict[str, float]]:
    """System calls per request of one relay (strace -c), per load."""
    out = Path(tempfile.mkdtemp(prefix="sentinel-strace-"))
    port = bp.free_port()
    p = subprocess.Popen(
        _relay_cmd(kind, port, up), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"

        async def go() -> dict[str, dict[str, float]]:
            got: dict[str, dict[str, float]] = {}
            await bp._load(port, CONCURRENCY, 16, None, STREAM)  # warm-up
            await bp._load(port, CONCURRENCY, 64, None, WHOLE)
            for name, body, n in LOADS:
                f = out / name
                cmd = ["strace", "-c", "-f", "-o", str(f), "-p", str(p.pid)]
                st = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
                await asyncio.sleep(1.0)  # attached
                r = await bp._load(port, CONCURRENCY, n, None, body)
                st.send_signal(signal.SIGINT)
                st.wait()
                assert r["errors"] == 0, r["errors"]
                counts: dict[str, float] = {}
                for line in f.read_text().splitlines():
                    cols = line.split()
                    if len(cols) >= 5 and cols[0][0].isdigit() and cols[-1] != "total":
                        counts[cols[-1]] = int(cols[3]) / (r["n"] + CONCURRENCY)  # + connects
                got[name] = counts
            return got

        return bp.new_loop().run_until_complete(go())
    finally:
        bp._stop(p)
        shutil.rmtree(out, ignore_errors=True)


def main_syscalls() -> None:
    if shutil.which("strace") is None:
        sys.exit("strace is not installed (apt-get install strace)")
    up_proc = bp._spawn(["--role", "upstream", "--port", str(up := bp.free_port())], [1])
    try:
        bp.pin([1])
        got = {kind: syscalls(kind, up) for kind in ("bytepipe", "proxy")}
        for load, _, _ in LOADS:
            names = sorted(set(got["bytepipe"][load]) | set(got["proxy"][load]))
            print(f"{load}: system calls per request   byte pipe   Sentinel")
            for name in names:
                a, b = got["bytepipe"][load].get(name, 0.0), got["proxy"][load].get(name, 0.0)
                if a >= 0.05 or b >= 0.05:
                    print(f"  {name:28s} {a:9.2f} {b:10.2f}")
    finally:
        bp._stop(up_proc)


def main() -> None:
    if "--syscalls" in sys.argv[1:]:
        main_syscalls()
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--base", required=True, help="git revision to compare with (e.g. HEAD~1)")
    ap.add_argument("--syscalls", action="store_true", help="system calls per request instead")
    a = ap.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    base_dir = Path(tempfile.mkdtemp(prefix="sentinel-base-"))
    subprocess.run(
        ["git", "worktree", "add", "--detach", "-f", str(base_dir), a.base],
        cwd=bp.ROOT,
        check=True,
        capture_output=True,
    )
    up_proc = None
    try:
        up = bp.free_port()
        up_proc = bp._spawn(["--role", "upstream", "--port", str(up)], [1])
        bp.pin([1])
        got = {}
        for name, kind, tree in (
            ("bytepipe", "bytepipe", bp.ROOT),
            ("base", "proxy", base_dir),
            ("new", "proxy", bp.ROOT),
        ):
            got[name] = measure(kind, tree, up)
            per = ", ".join(f"{v:9,.0f} per {k} request" for k, v in got[name].items())
            print(f"{name:8s}: instructions {per}", flush=True)
        for k, _, _ in LOADS:
            print(
                f"{k}: new / base ({a.base}) {got['new'][k] / got['base'][k]:.2f}; "
                f"new / bytepipe {got['new'][k] / got['bytepipe'][k]:.1f} (user space only)"
            )
    finally:
        if up_proc is not None:
            bp._stop(up_proc)
        subprocess.run(
            ["git", "worktree", "remove", "--force", str(base_dir)],
            cwd=bp.ROOT,
            capture_output=True,
        )


if __name__ == "__main__":
    main()
