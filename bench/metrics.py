"""/metrics render time and the readiness probe's cost to engine throughput (real vLLM).

    .venv/bin/python -m bench.metrics [--renders 2000] [--rounds 3] [--round-s 20]
                                      [--concurrency 8] [--max-tokens 32]
                                      [--engine-url URL] [--skip-throughput] [--out DIR]

Side by side in one run, against a real vLLM on the CPU (started here with the tiny
model unless --engine-url points at one):

1. render: ``MetricsRenderer.render()`` of Sentinel's full registry (engine status,
   per-process psutil series for the real engine tree, scrape and loop series) with
   the engine's ~70 vllm:* families passed through, vs. Sentinel-only series,
   interleaved; p50/p99/max in ms and the ratio. Goal: p99 <= 10 ms with passthrough.
   Also the cost of one engine scrape + parse (done every probes.metrics_interval_s,
   off the render path).
2. throughput: completion tokens/s under a fixed closed-loop load, rounds alternating
   without and with the probes running in their own process, as in Sentinel
   (inference probe every probes.interval_s and engine scrape every
   probes.metrics_interval_s, from the embedded default config); median per mode and
   the difference. Goal: under 1 %. On a small shared CPU box the spread between
   rounds of the same mode (printed) bounds what the difference can resolve.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from prometheus_client import CollectorRegistry

from bench.common import start_tiny_vllm, summarize
from sentinel.config import SentinelConfig, load_config
from sentinel.ops.metrics import MetricsRenderer
from sentinel.ops.stack import build_ops_stack
from sentinel.state import EngineStatus, ProcessInfo

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "var" / "tiny-model"


def summary_ms(ns: list[int]) -> dict[str, float]:
    return summarize(ns, "ms")


# ---- the engine ------------------------------------------------------------------
class Engine:
    def __init__(self, url: str | None) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        if url:
            self.url = url
            return
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(ROOT / "var" / "bench-metrics-engine.log", "wb")  # noqa: SIM115
        self.proc = start_tiny_vllm(port, self.log)

    def wait(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise SystemExit(f"engine exited {self.proc.returncode}; see its log")
            try:
                if httpx.get(self.url + "/health", timeout=2, trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise SystemExit(f"engine at {self.url} not healthy after {timeout}s")

    def processes(self) -> list[ProcessInfo]:
        """The engine tree with roles, as the supervisor would record it."""
        if self.proc is None:
            return []
        root = psutil.Process(self.proc.pid)
        out = [ProcessInfo(root.pid, "api_server", 1, root.create_time())]
        for child in root.children(recursive=True):
            try:
                title = " ".join(child.cmdline())
                role = (
                    "engine_core"
                    if "EngineCore" in title
                    else "worker"
                    if "Worker" in title
                    else "other"
                )
                out.append(ProcessInfo(child.pid, role, 1, child.create_time()))
            except psutil.Error:
                continue
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Control:
    def __init__(self, url: str) -> None:
        self.engine_base_url = url

    def request_restart(self, reason: str, detail: str = "") -> None:
        print(f"  (the probes asked for a restart: {reason}: {detail})")


def make_stack(cfg: SentinelConfig, engine: Engine) -> tuple[EngineStatus, Any]:
    status = EngineStatus()
    stack = build_ops_stack(cfg, status, CollectorRegistry(auto_describe=True), Control(engine.url))
    status.new_generation()
    status.mark_loaded()
    status.set_processes(engine.processes())
    return status, stack


# ---- 1. render -------------------------------------------------------------------
async def bench_render(cfg: SentinelConfig, engine: Engine, renders: int) -> dict[str, Any]:
    status, stack = make_stack(cfg, engine)
    scrape_ns = []
    for _ in range(30):
        t0 = time.perf_counter_ns()
        await stack.probes.scrape_once()
        scrape_ns.append(time.perf_counter_ns() - t0)
    await stack.probes.probe_once()
    stack.probes.evaluate()
    assert stack.probes.scraper.last_ok, stack.probes.scraper.last_error
    with_engine = stack.metrics
    own_only = MetricsRenderer(with_engine.registry, None)
    sizes = {"with_engine": len(with_engine.render()), "sentinel_only": len(own_only.render())}
    timings: dict[str, list[int]] = {"with_engine": [], "sentinel_only": []}
    for i in range(renders):
        # a fresh engine scrape before each render, as in production (the probes scrape
        # every second, Prometheus every 15 s): the passed-through families are parsed
        # lazily, on the first render after a scrape, and that cost is part of the render
        await stack.probes.scrape_once()
        order = (("with_engine", with_engine), ("sentinel_only", own_only))
        for name, renderer in order if i % 2 else order[::-1]:
            t0 = time.perf_counter_ns()
            renderer.render()
            timings[name].append(time.perf_counter_ns() - t0)
    await stack.probes.aclose()
    res = {k: {**summary_ms(v), "bytes": sizes[k]} for k, v in timings.items()}
    res["engine_scrape_and_parse"] = summary_ms(scrape_ns)
    res["families_passed_through"] = stack.probes.scraper.last.families
    return res


# ---- 2. throughput ---------------------------------------------------------------
async def load_round(url: str, seconds: float, concurrency: int, max_tokens: int) -> float:
    tokens = 0
    deadline = time.monotonic() + seconds
    body = {
        "model": "tiny",
        "prompt": "hello there",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
    }

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal tokens
        while time.monotonic() < deadline:
            r = await client.post(url + "/v1/completions", json=body)
            r.raise_for_status()
            tokens += r.json()["usage"]["completion_tokens"]

    t0 = time.monotonic()
    async with httpx.AsyncClient(
        trust_env=False, timeout=120, limits=httpx.Limits(max_connections=concurrency)
    ) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return tokens / (time.monotonic() - t0)


async def probe_only(cfg: SentinelConfig, url: str) -> None:
    """The probes alone, in their own process as in Sentinel, until SIGTERM."""
    status = EngineStatus()
    stack = build_ops_stack(cfg, status, CollectorRegistry(auto_describe=True), Control(url))
    status.new_generation()
    task = asyncio.create_task(stack.probes.run())
    while not status.loaded:  # tell the parent once the first probe went through
        await asyncio.sleep(0.05)
    print("READY", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    counts = status.probe_counts.get("inference", {})
    print(json.dumps({"probes": counts, "scrapes_failed": stack.probes.scraper.failures_total}))


def start_probe_process(url: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "bench.metrics", "--probe-only", "--engine-url", url]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)


def wait_probe_ready(proc: subprocess.Popen[str]) -> float:
    """Block until the prober has imported and probed once; return its CPU seconds so far."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("READY"):
            break
    else:
        raise SystemExit("the probe process exited before its first probe")
    t = psutil.Process(proc.pid).cpu_times()
    return t.user + t.system


def stop_probe_process(proc: subprocess.Popen[str]) -> tuple[dict[str, Any], float]:
    t = psutil.Process(proc.pid).cpu_times()
    cpu = t.user + t.system
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return (json.loads(lines[-1]) if lines else {}), cpu


async def bench_throughput(
    cfg: SentinelConfig,
    engine: Engine,
    rounds: int,
    round_s: float,
    concurrency: int,
    max_tokens: int,
) -> dict[str, Any]:
    await load_round(engine.url, 5, concurrency, max_tokens)  # warm-up
    tps: dict[str, list[float]] = {"probes_off": [], "probes_on": []}
    probes_ok = probes_failed = 0
    prober_cpu_s = prober_wall_s = 0.0
    for r in range(rounds):
        order = ("probes_off", "probes_on") if r % 2 == 0 else ("probes_on", "probes_off")
        for mode in order:
            proc = start_probe_process(engine.url) if mode == "probes_on" else None
            cpu0 = wait_probe_ready(proc) if proc is not None else 0.0  # imports done
            t0 = time.monotonic()
            rate = await load_round(engine.url, round_s, concurrency, max_tokens)
            if proc is not None:
                result, cpu1 = stop_probe_process(proc)
                prober_cpu_s += cpu1 - cpu0
                prober_wall_s += time.monotonic() - t0
                counts = result.get("probes", {})
                probes_ok += counts.get("ok", 0)
                probes_failed += counts.get("fail", 0)
            tps[mode].append(rate)
            print(f"  round {r + 1} {mode:10s} {rate:8.1f} tokens/s", flush=True)
    off, on = statistics.median(tps["probes_off"]), statistics.median(tps["probes_on"])
    return {
        "tokens_per_s": {k: [round(x, 1) for x in v] for k, v in tps.items()},
        "median_off": round(off, 1),
        "median_on": round(on, 1),
        "on_over_off": round(on / off, 4),
        "difference_pct": round((on - off) / off * 100, 2),
        "spread_off_pct": round((max(tps["probes_off"]) - min(tps["probes_off"])) / off * 100, 2),
        "prober_cpu_pct_of_one_core": round(prober_cpu_s / prober_wall_s * 100, 2),
        "inference_probes_ok": probes_ok,
        "inference_probes_failed": probes_failed,
        "probe_interval_s": cfg.probes.interval_s,
        "metrics_interval_s": cfg.probes.metrics_interval_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--renders", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--round-s", type=float, default=20.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--engine-url", default=None)
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--probe-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    cfg = load_config(None, sets=["engine.served_model_name=tiny", "ops.port=0"])
    if args.probe_only:
        asyncio.run(probe_only(cfg, args.engine_url))
        return
    engine = Engine(args.engine_url)
    result: dict[str, Any] = {"cpu_count": os.cpu_count()}
    try:
        print(f"engine: {engine.url} (waiting until healthy)", flush=True)
        engine.wait()
        for _ in range(3):  # fill the engine's histograms
            httpx.post(
                engine.url + "/v1/completions",
                trust_env=False,
                timeout=60,
                json={"model": "tiny", "prompt": "hi", "max_tokens": 4},
            )
        print(f"render /metrics x{args.renders} (interleaved):", flush=True)
        result["render"] = asyncio.run(bench_render(cfg, engine, args.renders))
        rd = result["render"]
        for k in ("sentinel_only", "with_engine"):
            v = rd[k]
            print(
                f"  {k:14s} p50 {v['p50_ms']:7.3f} ms  p99 {v['p99_ms']:7.3f} ms  "
                f"max {v['max_ms']:7.3f} ms  {v['bytes']} bytes"
            )
        ratio = rd["with_engine"]["p99_ms"] / rd["sentinel_only"]["p99_ms"]
        goal = "met" if rd["with_engine"]["p99_ms"] <= 10 else "NOT met"
        print(f"  p99 ratio with/without engine series: {ratio:.2f}x; goal p99 <= 10 ms: {goal}")
        s = rd["engine_scrape_and_parse"]
        print(
            f"  engine scrape+parse ({rd['families_passed_through']} families), once per "
            f"interval: p50 {s['p50_ms']:.2f} ms p99 {s['p99_ms']:.2f} ms"
        )
        if not args.skip_throughput:
            print(
                f"throughput: {args.rounds} rounds x {args.round_s:g}s per mode, "
                f"concurrency {args.concurrency}, max_tokens {args.max_tokens}:",
                flush=True,
            )
            result["throughput"] = tp = asyncio.run(
                bench_throughput(
                    cfg, engine, args.rounds, args.round_s, args.concurrency, args.max_tokens
                )
            )
            goal = "met" if abs(tp["difference_pct"]) < 1 else "NOT met"
            print(
                f"  median off {tp['median_off']} tokens/s, on {tp['median_on']} tokens/s: "
                f"on/off {tp['on_over_off']}, difference {tp['difference_pct']}% "
                f"(goal under 1%: {goal}; spread between off rounds "
                f"{tp['spread_off_pct']}%)"
            )
            print(
                f"  the probes' own process used {tp['prober_cpu_pct_of_one_core']}% of one "
                f"core during the rounds ({os.cpu_count()} cores here)"
            )
    finally:
        engine.stop()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "metrics.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
