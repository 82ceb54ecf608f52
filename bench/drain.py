"""Drain benchmark against the real vLLM engine (CPU, tiny model).

Per run: a fresh Sentinel; 16 streamed completions under way through its proxy; SIGTERM.
Measured from the signal: when the last stream ends (the streams' own remaining time,
the baseline: what they would take with no drain at all) and when Sentinel has exited
with no engine process left. The drain's cost is the difference (goal: under 0.5 s):
the engine's stop (TERM to the API server, its EngineCore and Worker after it) and
Sentinel's exit. Printed side by side, and as a ratio.

Usage: .venv/bin/python -m bench.drain [--runs 2] [--streams 16] [--max-tokens 240]
"""

from __future__ import annotations

import argparse
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

from bench.common import ENGINE_ARGS, SentinelRun, engine_available, wait_for


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _events(s: SentinelRun, t_sig: float) -> None:
    """Where the time after the signal went, from Sentinel's log (wall clock)."""
    import datetime

    wanted = (
        "drain wait over",
        "stopping",
        "engine generation terminated",
        "engine exited",
        "sentinel exiting",
    )
    recs = [r for r in s.log_records() if r.get("event") in wanted or r.get("event") == "draining"]
    if not recs:
        return
    t0 = None
    for r in recs:
        ts = datetime.datetime.fromisoformat(r["timestamp"].replace("Z", "+00:00")).timestamp()
        t0 = ts if t0 is None else t0
        extra = {k: r[k] for k in ("outcome", "seconds", "termed", "killed") if k in r}
        print(f"    +{ts - t0:6.3f}s  {r['event']} {extra or ''}")


def one_run(streams: int, max_tokens: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-drain-") as tmp:
        s = SentinelRun(
            Path(tmp),
            {
                "lifecycle": {"drain_timeout_s": 120},
                "supervisor": {"stop_grace_s": 15.0},
                # a busy 2-core machine: keep the probes from flapping readiness
                "probes": {"interval_s": 2.0, "timeout_s": 10.0, "freshness_s": 30.0},
                "logging": {"engine_lines": False},
                # float32: this machine's AMX attention kernel (bfloat16) dies of SIGILL
                "engine": {"args": list(ENGINE_ARGS)},
            },
        ).start()
        try:
            s.wait_serving()
            wait_for(lambda: s.get("/readyz").status_code == 200, 120, what="ready")
            procs = s.engine_tree()
            ends: list[float] = []
            ok: list[bool] = []
            started = [threading.Event() for _ in range(streams)]
            body = {
                "model": "tiny",
                "prompt": "hello",
                "max_tokens": max_tokens,
                "ignore_eos": True,
                "stream": True,
            }

            failures: list[str] = []

            def stream(ev: threading.Event) -> None:
                text, status = "", 0
                try:
                    with httpx.stream(
                        "POST", s.proxy_url + "/v1/completions", json=body, timeout=300
                    ) as r:
                        status = r.status_code
                        for part in r.iter_text():
                            text += part
                            if status == 200 and "data:" in part:
                                ev.set()
                except httpx.HTTPError as exc:
                    text += f" [{type(exc).__name__}: {exc}]"
                ends.append(time.monotonic())
                good = status == 200 and text.rstrip().endswith("data: [DONE]")
                ok.append(good)
                if not good:
                    failures.append(f"HTTP {status}: ...{text[-200:]!r}")

            threads = [threading.Thread(target=stream, args=(e,), daemon=True) for e in started]
            for t in threads:
                t.start()
            wait_for(lambda: all(e.is_set() for e in started), 300, what="streams under way")
            t_sig = time.monotonic()
            assert s.proc is not None
            s.proc.send_signal(signal.SIGTERM)
            s.proc.wait(300)
            t_exit = time.monotonic()
            wait_for(lambda: not any(_alive(p) for p in procs), 30, interval=0.01)
            t_gone = time.monotonic()
            for t in threads:
                t.join(60)
            last = max(ends)
            for f in failures:
                print("    incomplete stream:", f)
            _events(s, t_sig)
            return {
                "streams_s": last - t_sig,
                "exit_s": t_exit - t_sig,
                "gone_s": max(t_gone, t_exit) - t_sig,
                "added_s": max(t_gone, t_exit) - last,
                "complete": float(sum(ok)),
            }
        finally:
            s.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=240)
    args = ap.parse_args()
    if not engine_available():
        print("real vLLM or var/tiny-model missing: run `make setup`")
        return 2
    rows = []
    print(f"{args.streams} streams of {args.max_tokens} tokens in flight, then SIGTERM")
    print(f"  {'run':>3} {'streams end':>12} {'exit+gone':>10} {'added':>8} {'ratio':>6} complete")
    for i in range(args.runs):
        r = one_run(args.streams, args.max_tokens)
        rows.append(r)
        ratio = r["gone_s"] / r["streams_s"] if r["streams_s"] > 0 else float("nan")
        print(
            f"  {i + 1:>3} {r['streams_s']:11.3f}s {r['gone_s']:9.3f}s {r['added_s']:7.3f}s "
            f"{ratio:6.3f} {int(r['complete'])}/{args.streams}"
        )
    added = [r["added_s"] for r in rows]
    print(
        f"drain adds (Sentinel exited, no engine process left, after the last stream ended): "
        f"median {statistics.median(added):.3f}s, max {max(added):.3f}s (goal < 0.5 s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
