"""Proxy overhead: Sentinel's proxy vs a direct connection to the same upstream.

    .venv/bin/python -m bench.proxy [--quick] [--vllm URL | --start-vllm]

Processes (each its own interpreter, so the load generator is never the bottleneck):
  upstream   a minimal fast OpenAI-shaped server (raw asyncio + httptools, uvloop)
  proxy      Sentinel's proxy (``ProxyService``) with one tier pointing at the upstream,
             pinned to one CPU core (os.sched_setaffinity); payload logging on at the
             default 1% sample
  loadgen    raw asyncio + httptools keep-alive client; one connection per worker

Side by side in one run, direct and through the proxy alternated over 5 rounds, for
each scenario:
  1. non-streaming, concurrency 1: latency p50/p99, added p50 (goal <= 0.5 ms) and
     added p99 (goal <= 2 ms);
  2. non-streaming, concurrency 64: requests/s (goal >= 1500 through the proxy) and
     added p99 (goal <= 5 ms);
  3. streaming, 64 concurrent streams: SSE events out == events in, added
     time-to-first-token p99 (goal <= 1 ms) in steady state (stream starts spread
     out, 64 always in flight), and for synchronized bursts of 64 new streams;
  4. (with --vllm URL or --start-vllm) real vLLM streaming at concurrency 16: tokens/s
     through the proxy vs direct, judged two ways against 98%: 8 alternated rounds (16
     streams one way, then the other: includes what the proxy's CPU takes from the
     engine where they share a host, and the host's drift between rounds, +-15% here),
     and 6 rounds of 8 direct and 8 proxied streams at once in the same engine batches
     (what the relay adds per stream; host drift cancels); and the CPU the proxy spends
     per relayed token against the engine's own (with --start-vllm).
     --vllm-layout split (default): the engine confined to cores 1.., the proxy and the
     load generator on core 0, as on a GPU host where the engine does not compete with
     Sentinel for CPU; shared: everything on every core (a CPU engine: the ratio is then
     bounded by the CPU the proxy takes from the engine, printed as the CPU-bound cap).

The goals are judged on the median of the rounds' own figures (robust to one round
caught by a slow spell of a shared machine); the pooled figures are printed beside,
with the share of each proxied round's time that the hypervisor stole from the proxy's
core (/proc/stat steal): on a shared VM the tails follow it. The rounds in which no
core lost any time to the hypervisor (neither the direct run nor the proxied one) are
named, with their own added p99: what the code adds when the machine is its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httptools
import psutil

from bench import common

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pin(cores: list[int]) -> None:
    avail = sorted(os.sched_getaffinity(0))
    chosen = {avail[c % len(avail)] for c in cores}
    os.sched_setaffinity(0, chosen)


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


# ---------------------------------------------------------------------------------------
# upstream: a minimal fast server
# ---------------------------------------------------------------------------------------
_JSON = json.dumps(
    {
        "id": "cmpl-bench",
        "object": "text_completion",
        "model": "bench",
        "choices": [{"index": 0, "text": "hello world", "finish_reason": "length"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }
).encode()
_RESP = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
    + str(len(_JSON)).encode()
    + b"\r\n\r\n"
    + _JSON
)
_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class _UpstreamProto(asyncio.Protocol):
    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.parser = httptools.HttpRequestParser(self)
        self.body = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        body = bytes(self.body)
        self.body.clear()
        assert self.transport is not None
        if b'"stream": true' in body or b'"stream":true' in body:
            n = 16
            try:
                n = int(json.loads(body).get("max_tokens") or 16)
            except ValueError:
                pass
            asyncio.get_running_loop().create_task(self._stream(n))
        else:
            self.transport.write(_RESP)

    async def _stream(self, n: int) -> None:
        t = self.transport
        assert t is not None
        t.write(_SSE_HEAD)
        for i in range(n):
            ev = b'data: {"choices":[{"index":0,"text":"t%d"}]}\n\n' % i
            t.write(_chunk(ev))
            await asyncio.sleep(self.interval)
        t.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")


def run_upstream(port: int, interval: float) -> None:
    loop = new_loop()
    asyncio.set_event_loop(loop)
    server = loop.run_until_complete(
        loop.create_server(lambda: _UpstreamProto(interval), "127.0.0.1", port, backlog=4096)
    )
    loop.add_signal_handler(signal.SIGTERM, loop.stop)
    print("ready", flush=True)
    loop.run_forever()
    server.close()


# ---------------------------------------------------------------------------------------
# proxy: Sentinel's ProxyService pointing at one upstream
# ---------------------------------------------------------------------------------------
def run_proxy(
    port: int,
    upstream: str,
    payload_dir: str,
    transport: str,
    gc_tuned: bool = True,
) -> None:
    from prometheus_client import CollectorRegistry

    from sentinel.config.schema import (
        LoggingConfig,
        PayloadLogConfig,
        ProxyConfig,
        RuntimeConfig,
        TierConfig,
        TierTimeouts,
    )
    from sentinel.logs import configure_logging
    from sentinel.proxy.service import ProxyService
    from sentinel.runtime import tune_gc
    from sentinel.state import EngineStatus

    configure_logging(LoggingConfig(level="warning", format="json"), stream=sys.stderr)
    cfg = ProxyConfig(
        host="127.0.0.1",
        port=port,
        tiers=[
            TierConfig(
                name="upstream",
                kind="openai",
                base_url=upstream,
                max_concurrency=1024,
                timeouts=TierTimeouts(first_byte_s=60, total_s=600),
            )
        ],
    )
    factory = None  # Sentinel's own upstream client (the only one since aiohttp's left)

    async def main() -> None:
        kwargs = {"transport_factory": factory} if factory else {}
        svc = ProxyService(
            cfg,
            PayloadLogConfig(dir=Path(payload_dir), enabled=payload_dir != "off"),
            EngineStatus(),
            CollectorRegistry(),
            engine_base_url=lambda: upstream,
            **kwargs,
        )
        svc.prepare()
        if gc_tuned:  # as `sentinel run` does; else CPython's defaults
            tune_gc(RuntimeConfig())
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, svc.server.request_stop)
        task = asyncio.create_task(svc.run())
        await svc.server.wait_started()
        print("ready", flush=True)
        await task

    loop = new_loop()
    loop.run_until_complete(main())


# ---------------------------------------------------------------------------------------
# load generator: raw keep-alive client
# ---------------------------------------------------------------------------------------
class _ClientProto(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[None] | None = None
        self.first: float | None = None
        self.events = 0
        self.status = 0
        self.lost: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if self.first is None:
            self.first = time.perf_counter()
        self.events += body.count(b"data: ")

    def on_message_complete(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("connection lost"))

    async def request(self, raw: bytes) -> tuple[int, float, float | None, int]:
        self.done = asyncio.get_running_loop().create_future()
        self.first = None
        self.events = 0
        t0 = time.perf_counter()
        assert self.transport is not None
        self.transport.write(raw)
        await self.done
        t1 = time.perf_counter()
        return self.status, t1 - t0, (self.first - t0) if self.first else None, self.events


def _raw_request(host: str, port: int, path: str, body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(data)}\r\n\r\n"
    ).encode() + data


async def _load(
    port: int,
    concurrency: int,
    requests: int | None,
    duration: float | None,
    body: dict[str, Any],
    path: str = "/v1/completions",
    rate: float | None = None,
    stagger: float = 0.0,
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    raw = _raw_request("127.0.0.1", port, path, body)
    conns = []
    for _ in range(concurrency):
        _, proto = await loop.create_connection(_ClientProto, "127.0.0.1", port)
        conns.append(proto)
    # warm-up
    await asyncio.gather(*(c.request(raw) for c in conns))
    lat: list[float] = []
    ttft: list[float] = []
    events: list[int] = []
    errors = 0
    remaining = [requests if requests is not None else 1 << 60]
    stop_at = time.perf_counter() + duration if duration else None

    t_start = time.perf_counter()

    async def worker(i: int, c: _ClientProto) -> None:
        nonlocal errors
        k = 0
        if stagger:  # spread the first requests out: steady state, not one burst
            await asyncio.sleep(i * stagger)
        while remaining[0] > 0 and (stop_at is None or time.perf_counter() < stop_at):
            remaining[0] -= 1
            if rate:  # open-loop pacing: this worker's k-th request is due at a fixed time
                due = t_start + (k * concurrency + i) / rate
                k += 1
                wait = due - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
            status, lt, ft, ev = await c.request(raw)
            if status != 200:
                errors += 1
            lat.append(lt)
            if ft is not None:
                ttft.append(ft)
            events.append(ev)

    t0 = time.perf_counter()
    steal0 = common.steal_s(0)  # the proxy's core
    steal_all0 = common.steal_s()  # every core: the upstream's and load generator's too
    await asyncio.gather(*(worker(i, c) for i, c in enumerate(conns)))
    wall = time.perf_counter() - t0
    steal = common.steal_s(0) - steal0
    steal_all = common.steal_s() - steal_all0
    for c in conns:
        assert c.transport is not None
        c.transport.close()
    return {
        "lat": lat,
        "ttft": ttft,
        "events": events,
        "errors": errors,
        "wall": wall,
        "n": len(lat),
        "steal": steal,
        "steal_all": steal_all,
    }


ROUNDS = 5


async def _paired(
    up: int,
    px: int,
    concurrency: int,
    requests: int | None,
    duration: float | None,
    body: dict[str, Any],
    **kw: Any,
) -> tuple[dict[str, Any], dict[str, Any], list[tuple[dict[str, Any], dict[str, Any]]]]:
    """Direct and proxied runs alternated over ROUNDS rounds (each a ROUNDS-th of the
    work), so that a slow spell of a shared machine hits both sides alike. Returns the
    pooled samples of each side and the rounds' own (direct, proxy) results."""
    out: list[dict[str, Any]] = [{}, {}]
    rounds: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for _ in range(ROUNDS):
        pair = []
        for side, port in enumerate((up, px)):
            r = await _load(
                port,
                concurrency,
                requests // ROUNDS if requests else None,
                duration / ROUNDS if duration else None,
                body,
                **kw,
            )
            pair.append(r)
            acc = out[side]
            for key in ("lat", "ttft", "events"):
                acc.setdefault(key, []).extend(r[key])
            for key in ("errors", "wall", "n"):
                acc[key] = acc.get(key, 0) + r[key]
        rounds.append((pair[0], pair[1]))
    return out[0], out[1], rounds


def added_by_round(
    rounds: list[tuple[dict[str, Any], dict[str, Any]]], key: str, p: float
) -> tuple[list[float], float]:
    """Each round's added percentile (proxy minus direct, seconds), and their median:
    the figure a goal is judged by, robust to one round caught by a slow spell of
    the machine (the pooled figure is printed beside it)."""
    added = [pct(pr[key], p) - pct(dr[key], p) for dr, pr in rounds]
    return added, statistics.median(added)


def _rounds_text(added: list[float]) -> str:
    return "[" + ", ".join(f"{x * 1e3:.2f}" for x in added) + "] ms"


def steal_by_round(rounds: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[float]:
    """Share of each proxied round's wall time stolen from the proxy's core by the
    hypervisor: the rounds' tails follow it on a shared VM."""
    return [pr["steal"] / pr["wall"] if pr["wall"] else 0.0 for _, pr in rounds]


def _steal_text(rounds: list[tuple[dict[str, Any], dict[str, Any]]]) -> str:
    shares = steal_by_round(rounds)
    return "[" + ", ".join(f"{x * 100:.1f}" for x in shares) + "] %"


def quiet_rounds(rounds: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[int]:
    """Indexes of the rounds in which the hypervisor took no recorded CPU time from any
    core, in the direct run nor in the proxied one (/proc/stat counts steal in 10 ms
    ticks: a quiet round lost less than about 10 ms per core)."""
    return [i for i, (dr, pr) in enumerate(rounds) if dr["steal_all"] == 0 == pr["steal_all"]]


def _quiet_text(added: list[float], rounds: list[tuple[dict[str, Any], dict[str, Any]]]) -> str:
    q = quiet_rounds(rounds)
    if not q:
        return "no round without stolen CPU time"
    return f"rounds without stolen CPU time on any core: {len(q)}, added p99 " + _rounds_text(
        [added[i] for i in q]
    )


def pct(xs: list[float], p: float) -> float:
    """Percentile p (0..100)."""
    return common.pct(xs, p / 100)


def ms(x: float) -> str:
    return f"{x * 1000:.3f} ms"


# ---------------------------------------------------------------------------------------
# orchestration
# ---------------------------------------------------------------------------------------
def _spawn(args: list[str], cores: list[int] | None, tree: Path = ROOT) -> subprocess.Popen[str]:
    """``bench.proxy`` in another role, from the source ``tree`` (this checkout by
    default), once it says it is ready."""
    cmd = [sys.executable, "-m", "bench.proxy", *args]
    if cores is not None:
        cmd += ["--cores", ",".join(map(str, cores))]
    p = subprocess.Popen(cmd, cwd=tree, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    line = p.stdout.readline()
    if line.strip() != "ready":
        p.kill()
        raise RuntimeError(f"{args[:2]} did not start: {line!r}")
    return p


def _stop(p: subprocess.Popen[str]) -> None:
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()


def _judge(ok: bool) -> str:
    return "PASS" if ok else "MISS"


async def scenarios(
    up: int,
    px: int,
    quick: bool,
    vllm: str | None,
    vllm_px: int | None,
    vllm_model: str,
    proxy_pid: int | None = None,
) -> dict[str, Any]:
    res: dict[str, Any] = {}
    n1 = 1500 if quick else 5000
    body = {"model": "bench", "prompt": "hi", "max_tokens": 2}

    print("\n== 1. non-streaming, concurrency 1")
    d, p, rounds = await _paired(up, px, 1, n1, None, body)
    pooled50 = pct(p["lat"], 50) - pct(d["lat"], 50)
    pooled99 = pct(p["lat"], 99) - pct(d["lat"], 99)
    r50, a50 = added_by_round(rounds, "lat", 50)
    r99, a99 = added_by_round(rounds, "lat", 99)
    print(f"  direct p50 {ms(pct(d['lat'], 50))} p99 {ms(pct(d['lat'], 99))}")
    print(f"  proxy  p50 {ms(pct(p['lat'], 50))} p99 {ms(pct(p['lat'], 99))}  errors {p['errors']}")
    print(f"  added p50 by round {_rounds_text(r50)}; p99 by round {_rounds_text(r99)}")
    print(
        f"  added (median of rounds) p50 {ms(a50)} (goal <= 0.5 ms: {_judge(a50 <= 0.0005)})  "
        f"p99 {ms(a99)} (goal <= 2 ms: {_judge(a99 <= 0.002)}); pooled p50 {ms(pooled50)} "
        f"p99 {ms(pooled99)}"
    )
    res["c1"] = {
        "added_p50_ms": a50 * 1e3,
        "added_p99_ms": a99 * 1e3,
        "added_p99_by_round_ms": [x * 1e3 for x in r99],
        "pooled_added_p50_ms": pooled50 * 1e3,
        "pooled_added_p99_ms": pooled99 * 1e3,
        "errors": p["errors"] + d["errors"],
    }

    print("\n== 2. non-streaming, concurrency 64, proxy pinned to one core")
    dur = 4.0 if quick else 10.0
    d, p, _ = await _paired(up, px, 64, None, dur, body)
    rps_d, rps_p = d["n"] / d["wall"], p["n"] / p["wall"]
    a99 = pct(p["lat"], 99) - pct(d["lat"], 99)
    print(f"  direct {rps_d:8.0f} req/s  p50 {ms(pct(d['lat'], 50))} p99 {ms(pct(d['lat'], 99))}")
    print(
        f"  proxy  {rps_p:8.0f} req/s  p50 {ms(pct(p['lat'], 50))} p99 {ms(pct(p['lat'], 99))}"
        f"  errors {p['errors']}"
    )
    print(
        f"  proxy req/s {rps_p:.0f} (goal >= 1500: {_judge(rps_p >= 1500)}), ratio "
        f"{rps_p / rps_d:.2f} of direct; added p99 {ms(a99)} "
        f"(saturated)"
    )
    print("   (saturated, closed loop: latency there is queueing, 64 / throughput)")
    cpu0 = _tree_cpu_s(proxy_pid)
    d, p, rounds = await _paired(up, px, 64, None, dur, body, rate=1500)
    cpu_per_req = (_tree_cpu_s(proxy_pid) - cpu0) / p["n"] if p["n"] else 0.0
    pooled = pct(p["lat"], 99) - pct(d["lat"], 99)
    rb99, b99 = added_by_round(rounds, "lat", 99)
    print(
        f"  at 1500 req/s offered over 64 connections: direct p50 {ms(pct(d['lat'], 50))} "
        f"p99 {ms(pct(d['lat'], 99))}; proxy p50 {ms(pct(p['lat'], 50))} "
        f"p99 {ms(pct(p['lat'], 99))} ({p['n'] / p['wall']:.0f} req/s done, "
        f"errors {p['errors']})"
    )
    print(
        f"  added p99 at 1500 req/s by round {_rounds_text(rb99)}: median {ms(b99)} "
        f"(goal <= 5 ms: {_judge(b99 <= 0.005)}); pooled {ms(pooled)}"
    )
    print(f"   CPU time stolen from the proxy's core (hypervisor) by round {_steal_text(rounds)}")
    print(f"   {_quiet_text(rb99, rounds)}")
    if proxy_pid is not None:  # the proxy is idle during the direct rounds
        print(f"   proxy CPU per request at 1500 req/s: {cpu_per_req * 1e6:.0f} us (user + system)")
    res["c64"] = {
        "proxy_cpu_per_request_us": cpu_per_req * 1e6,
        "rps_proxy": rps_p,
        "rps_direct": rps_d,
        "added_p99_saturated_ms": a99 * 1e3,
        "added_p99_at_1500_ms": b99 * 1e3,
        "added_p99_at_1500_by_round_ms": [x * 1e3 for x in rb99],
        "pooled_added_p99_at_1500_ms": pooled * 1e3,
        "steal_share_by_round": steal_by_round(rounds),
        "quiet_rounds": quiet_rounds(rounds),
        "errors": p["errors"] + d["errors"],
    }

    print("\n== 3. streaming, 64 concurrent streams (32 events each, 20 ms apart = 50 tokens/s)")
    sbody = {"model": "bench", "prompt": "hi", "max_tokens": 32, "stream": True}
    ns = 640 if quick else 1920
    want = 33  # 32 tokens + [DONE]
    # steady state: stream starts spread over one stream's life (32 x 20 ms / 64 = 10 ms
    # apart), so 64 are always in flight and a new one arrives every 10 ms; then a
    # synchronized burst: all 64 start together, every wave (worst case: the 64th new
    # request waits for the 63 before it)
    for label, stagger in (("steady", 32 * 0.02 / 64), ("burst", 0.0)):
        d, p, rounds = await _paired(up, px, 64, ns, None, sbody, stagger=stagger)
        ok_d = sum(1 for e in d["events"] if e == want)
        ok_p = sum(1 for e in p["events"] if e == want)
        pooled = pct(p["ttft"], 99) - pct(d["ttft"], 99)
        r99, a99 = added_by_round(rounds, "ttft", 99)
        a50 = pct(p["ttft"], 50) - pct(d["ttft"], 50)
        same = ok_p == p["n"] and sum(p["events"]) == sum(d["events"])
        print(f"  [{label}]")
        print(
            f"  direct ttft p50 {ms(pct(d['ttft'], 50))} p99 {ms(pct(d['ttft'], 99))}  "
            f"streams complete {ok_d}/{d['n']}"
        )
        print(
            f"  proxy  ttft p50 {ms(pct(p['ttft'], 50))} p99 {ms(pct(p['ttft'], 99))}  "
            f"streams complete {ok_p}/{p['n']}"
        )
        goal = f" (goal <= 1 ms: {_judge(a99 <= 0.001)})" if label == "steady" else ""
        print(
            f"  events out == events in: {_judge(same)}"
            f" ({sum(p['events'])} vs {sum(d['events'])}); added ttft p50 {ms(a50)}, "
            f"p99 by round {_rounds_text(r99)}: median {ms(a99)}{goal}; pooled {ms(pooled)}"
        )
        print(f"   CPU time stolen from the proxy's core by round {_steal_text(rounds)}")
        print(f"   {_quiet_text(r99, rounds)}")
        res["stream" if label == "steady" else "stream_burst"] = {
            "events_proxy": sum(p["events"]),
            "events_direct": sum(d["events"]),
            "added_ttft_p99_ms": a99 * 1e3,
            "added_ttft_p99_by_round_ms": [x * 1e3 for x in r99],
            "pooled_added_ttft_p99_ms": pooled * 1e3,
            "added_ttft_p50_ms": a50 * 1e3,
            "steal_share_by_round": steal_by_round(rounds),
            "quiet_rounds": quiet_rounds(rounds),
        }

    return res


def _tree_cpu_s(pid: int | None) -> float:
    """CPU seconds of a process and all its descendants (0 when unknown or gone)."""
    if pid is None:
        return 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


async def real_vllm(
    vllm: str,
    vllm_px: int,
    quick: bool,
    vllm_model: str,
    proxy_pid: int | None = None,
    engine_pid: int | None = None,
) -> dict[str, Any]:
    res: dict[str, Any] = {}
    print("\n== 4. real vLLM streaming, concurrency 16 (64 tokens each, ignore_eos)")
    port_v = int(vllm.rsplit(":", 1)[1])
    vbody = {
        "model": vllm_model,
        "prompt": "hello",
        "max_tokens": 64,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0,
    }
    acc = {side: {"tok": 0, "wall": 0.0, "engine_cpu": 0.0, "proxy_cpu": 0.0} for side in "dp"}
    ratios: list[float] = []
    rounds = 3 if quick else 8
    each = 6.0 if quick else 8.0
    for _ in range(rounds):  # alternate to cancel drift on a shared machine
        tps = {}
        for side, port in (("d", port_v), ("p", vllm_px)):
            e0, p0 = _tree_cpu_s(engine_pid), _tree_cpu_s(proxy_pid)
            r = await _load(port, 16, None, each, vbody)
            tok = sum(max(e - 1, 0) for e in r["events"])
            a = acc[side]
            a["tok"] += tok
            a["wall"] += r["wall"]
            a["engine_cpu"] += _tree_cpu_s(engine_pid) - e0
            a["proxy_cpu"] += _tree_cpu_s(proxy_pid) - p0
            tps[side] = tok / r["wall"]
        ratios.append(tps["p"] / tps["d"])
    # simultaneous: 8 streams direct and 8 through the proxy in the same engine batches,
    # so a slow spell of the host hits both sides alike; a connection's tokens/s then
    # differ only by what the proxy adds to each request
    sim: list[float] = []
    for _ in range(3 if quick else 6):
        rd, rp = await asyncio.gather(
            _load(port_v, 8, None, each, vbody), _load(vllm_px, 8, None, each, vbody)
        )
        tok_d = sum(max(e - 1, 0) for e in rd["events"])
        tok_p = sum(max(e - 1, 0) for e in rp["events"])
        if tok_d:
            sim.append((tok_p / rp["wall"]) / (tok_d / rd["wall"]))
    d, p = acc["d"], acc["p"]
    td, tp = d["tok"] / d["wall"], p["tok"] / p["wall"]
    ratio = statistics.median(ratios)
    sim_ratio = statistics.median(sim) if sim else float("nan")
    print(f"  direct {td:8.1f} tokens/s   proxy {tp:8.1f} tokens/s   pooled ratio {tp / td:.3f}")
    print(
        f"  alternated, ratio by round [{', '.join(f'{x:.3f}' for x in ratios)}]: "
        f"median {ratio:.3f} (goal >= 0.98: {_judge(ratio >= 0.98)}; includes what the "
        "proxy's CPU takes from the engine on a shared host, and the host's drift)"
    )
    print(
        f"  simultaneous (8 direct + 8 proxied streams, same batches), ratio by round "
        f"[{', '.join(f'{x:.3f}' for x in sim)}]: median {sim_ratio:.3f}"
        f" (goal >= 0.98: {_judge(sim_ratio >= 0.98)}; what the relay adds per stream)"
    )
    out = {"tps_direct": td, "tps_proxy": tp, "ratio": ratio, "pooled_ratio": tp / td}
    out["ratio_by_round"] = ratios
    out["simultaneous_ratio"] = sim_ratio
    out["simultaneous_ratio_by_round"] = sim
    if proxy_pid is not None and p["tok"]:
        proxy_us = p["proxy_cpu"] / p["tok"] * 1e6
        out["proxy_cpu_us_per_token"] = proxy_us
        line = f"  proxy CPU {proxy_us:.1f} us per relayed token"
        if engine_pid is not None and d["tok"]:
            engine_us = d["engine_cpu"] / d["tok"] * 1e6
            cpu_ratio = engine_us / (engine_us + proxy_us)
            out["engine_cpu_us_per_token"] = engine_us
            out["cpu_bound_ratio"] = cpu_ratio
            line += (
                f"; engine CPU {engine_us:.1f} us per token: where CPU is the bottleneck "
                f"(a CPU engine), tokens/s through the proxy can be at most {cpu_ratio:.3f}"
                " of direct"
            )
        print(line)
    res["vllm"] = out
    return res


def _start_vllm(port: int, cores: list[int] | None) -> subprocess.Popen[bytes]:
    p = common.start_tiny_vllm(port, cores=cores)
    import urllib.request

    deadline = time.time() + 600
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return p
        except OSError:
            time.sleep(1)
    os.killpg(p.pid, signal.SIGKILL)
    raise RuntimeError("vLLM did not become healthy")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--role", choices=["bench", "upstream", "proxy"], default="bench")
    ap.add_argument("--port", type=int)
    ap.add_argument("--upstream")
    ap.add_argument("--payload-dir")
    ap.add_argument("--cores")
    ap.add_argument(
        "--interval",
        type=float,
        default=0.02,
        help="seconds between the fast upstream's stream events",
    )
    ap.add_argument("--no-payloads", action="store_true", help="payload logging off")
    ap.add_argument("--quick", action="store_true", help="fewer requests, shorter phases")
    ap.add_argument(
        "--transport",
        default="raw",
        choices=["raw"],
        help="the proxy's upstream client (raw: Sentinel's default)",
    )
    ap.add_argument(
        "--gc",
        default="tuned",
        choices=["tuned", "default"],
        help="the proxy's garbage collector: Sentinel's runtime.gc_* defaults, or CPython's",
    )
    ap.add_argument("--vllm", help="base URL of a running vLLM (scenario 4)")
    ap.add_argument("--vllm-model", default="tiny")
    ap.add_argument("--start-vllm", action="store_true", help="start vLLM on the tiny model")
    ap.add_argument(
        "--vllm-layout",
        default="split",
        choices=["split", "shared"],
        help="split: the engine on cores 1.., the proxy and load generator on core 0 (a GPU "
        "host, where the engine does not compete with Sentinel for CPU); shared: all on "
        "every core (a CPU engine, bounded by the CPU the proxy takes from it)",
    )
    ap.add_argument("--json", help="write the figures here as JSON")
    a = ap.parse_args()
    if a.cores:
        pin([int(c) for c in a.cores.split(",")])
    if a.role == "upstream":
        run_upstream(a.port, a.interval)
        return
    if a.role == "proxy":
        run_proxy(a.port, a.upstream, a.payload_dir, a.transport, a.gc == "tuned")
        return

    ncpu = len(os.sched_getaffinity(0))
    proxy_core = [0]
    other = [c for c in range(ncpu) if c != 0] or [0]
    print(
        f"cpus {ncpu}: proxy pinned to core {proxy_core}, upstream and load generator on "
        f"{other}; proxy upstream client: {a.transport}"
    )
    pin(other)
    procs: list[subprocess.Popen[Any]] = []
    vllm_proc = None
    try:
        up = free_port()
        procs.append(
            _spawn(["--role", "upstream", "--port", str(up), "--interval", str(a.interval)], other)
        )
        tmp = "off" if a.no_payloads else tempfile.mkdtemp(prefix="bench-proxy-")
        px = free_port()
        procs.append(
            _spawn(
                [
                    "--role",
                    "proxy",
                    "--port",
                    str(px),
                    "--upstream",
                    f"http://127.0.0.1:{up}",
                    "--payload-dir",
                    tmp,
                    "--transport",
                    a.transport,
                    "--gc",
                    a.gc,
                ],
                proxy_core,
            )
        )
        loop = new_loop()
        res = loop.run_until_complete(
            scenarios(up, px, a.quick, None, None, a.vllm_model, proxy_pid=procs[-1].pid)
        )
        for p in procs:  # free the CPU before the real engine runs
            _stop(p)
        procs.clear()
        split = a.vllm_layout == "split" and ncpu > 1
        engine_cores = other if split else None
        side_cores = proxy_core if split else None  # the proxy's and the load generator's
        pin(side_cores or list(range(ncpu)))
        vllm = a.vllm
        if a.start_vllm:
            vport = free_port()
            where = f"cores {engine_cores}" if split else "every core"
            print(f"\nstarting vLLM on port {vport} ({where}) ...", flush=True)
            vllm_proc = _start_vllm(vport, engine_cores)
            vllm = f"http://127.0.0.1:{vport}"
        if vllm:
            vpx = free_port()
            print(
                f"layout {a.vllm_layout}: proxy and load generator on "
                f"{side_cores or 'every core'}"
                + (", the engine on the others" if split else ", with the engine")
            )
            procs.append(
                _spawn(
                    [
                        "--role",
                        "proxy",
                        "--port",
                        str(vpx),
                        "--upstream",
                        vllm,
                        "--payload-dir",
                        tmp,
                        "--transport",
                        a.transport,
                    ],
                    side_cores,
                )
            )
            res.update(
                loop.run_until_complete(
                    real_vllm(
                        vllm,
                        vpx,
                        a.quick,
                        a.vllm_model,
                        proxy_pid=procs[-1].pid,
                        engine_pid=vllm_proc.pid if vllm_proc is not None else None,
                    )
                )
            )
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=2))
    finally:
        for p in procs:
            _stop(p)
        if vllm_proc is not None:
            os.killpg(vllm_proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
