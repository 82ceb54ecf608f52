"""Probes and the ops server against real vLLM on the CPU (one Sentinel for the module).

Order matters (pytest keeps file order): start-up, metrics, the SIGSTOP readiness
check, the CLI, and last the stall that restarts the engine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
import pytest

from tests.helpers import wait_for
from tests.real.harness import ROOT, SentinelProcess, engine_available, wait_gone

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(not engine_available(), reason="vLLM or the tiny model is not installed"),
]

PROBES = {
    "interval_s": 1.0,
    "timeout_s": 2.0,
    "freshness_s": 4.0,
    "metrics_interval_s": 0.5,
    "stall_window_s": 4.0,
    "on_stall": "restart",
    "stall_restart_after_s": 0.0,
}


def _get(sp: SentinelProcess, path: str) -> httpx.Response | None:
    try:
        return sp.get(path, timeout=3)
    except httpx.HTTPError:
        return None


@pytest.fixture(scope="module")
def sentinel(sentinel_factory):
    """One Sentinel for the module; what the ops server said while the model loaded."""
    sp: SentinelProcess = sentinel_factory({"probes": PROBES}, name="probes")
    early: dict[str, Any] = {}
    first = wait_for(lambda: _get(sp, "/startupz"), 60, interval=0.2, what="the ops server")
    early["startupz"] = first
    early["livez"] = _get(sp, "/livez")
    early["readyz"] = _get(sp, "/readyz")
    early["engine_serving_then"] = sp.engine_healthy()
    sp.wait_serving()
    wait_for(
        lambda: (r := _get(sp, "/readyz")) is not None and r.status_code == 200,
        60,
        interval=0.5,
        what="/readyz 200",
    )
    return sp, early


def _stop_engine(sp: SentinelProcess, sig: int) -> list[int]:
    roles = sp.engine_processes_by_role()
    pids = [p.pid for role in ("engine_core", "worker") for p in roles.get(role, [])]
    assert len(pids) >= 2, f"expected EngineCore and Worker, got {roles}"
    for pid in pids:
        os.kill(pid, sig)
    return pids


def test_startupz_is_503_while_the_model_loads_and_200_after(sentinel):
    sp, early = sentinel
    first = early["startupz"]
    assert not early["engine_serving_then"], "the engine was up before the first look"
    assert first.status_code == 503
    body = first.json()
    assert body["started"] is False and body["reason"]
    assert early["livez"].status_code == 200  # loading never fails liveness
    assert early["readyz"].status_code == 503
    after = sp.get("/startupz")
    assert after.status_code == 200
    assert after.json()["started"] is True and after.json()["load_s"] > 0


def test_metrics_pass_promtool_with_the_engines_series(sentinel):
    sp, _ = sentinel
    for _ in range(3):
        assert sp.complete(max_tokens=4).status_code == 200
    wait_for(
        lambda: "vllm_generation_tokens_total" in sp.get("/metrics").text,
        10,
        what="the engine's series on /metrics",
    )
    text = sp.get("/metrics").text
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    res = subprocess.run(
        [promtool, "check", "metrics"], input=text, text=True, capture_output=True, timeout=60
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert 'sentinel_engine_state{state="ready"} 1.0' in text
    assert 'sentinel_probe_success{probe="inference"} 1.0' in text
    for role in ("sentinel", "api_server", "engine_core", "worker"):
        assert f'role="{role}"' in text, f"no per-process series for {role}"
    assert "vllm_num_requests_running" in text and "vllm_e2e_request_latency_seconds_bucket" in text


def test_sigstop_engine_fails_readyz_while_vllm_health_stays_200(sentinel):
    sp, _ = sentinel
    assert sp.get("/readyz").status_code == 200
    pids = _stop_engine(sp, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        wait_for(
            lambda: sp.get("/readyz").status_code == 503,
            5,
            interval=0.1,
            what="/readyz 503 after SIGSTOP",
        )
        took = time.monotonic() - t0
        # vLLM's own health check still says all is well: that is why these probes exist
        assert httpx.get(sp.engine_url + "/health", timeout=5).status_code == 200
        assert sp.get("/livez").status_code == 200
        body = sp.get("/readyz").json()
        assert "inference_probe" in body["failed"], body
        assert took < 5
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    wait_for(
        lambda: sp.get("/readyz").status_code == 200,
        15,
        interval=0.2,
        what="/readyz 200 after SIGCONT",
    )
    assert sp.status()["generation"] == 1  # idle engine: no stall, no restart


def test_sentinel_status_cli_renders_the_real_status(sentinel):
    sp, _ = sentinel
    env = {**os.environ, "COLUMNS": "200"}
    res = subprocess.run(
        [sys.executable, "-m", "sentinel", "status", "--url", sp.ops_url],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )
    assert res.returncode == 0, res.stderr
    assert "ready" in res.stdout and "engine_core" in res.stdout and "inference" in res.stdout
    res = subprocess.run(
        [sys.executable, "-m", "sentinel", "status", "--url", sp.ops_url, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )
    doc = json.loads(res.stdout)
    assert doc["state"] == "ready"
    assert {p["role"] for p in doc["processes"]} >= {"api_server", "engine_core", "worker"}


def test_200_slowloris_connections_leave_the_ops_probes_and_completions_working(sentinel):
    """The ops port's limits (ops.limits): 200 connections trickling headers, from 10
    addresses (127.0.0.x: other hosts, as far as the port can tell), and 50 more from one
    address (beyond max_connections_per_client: closed at once, counted). The kubelet's
    probes (1 s timeout) and completions through the proxy keep working."""
    sp, _ = sentinel
    port = int(sp.ops_url.rsplit(":", 1)[1])

    def connect(source: str) -> socket.socket:
        c = socket.socket()
        c.bind((source, 0))
        c.connect(("127.0.0.1", port))
        return c

    def closed(c: socket.socket) -> bool:
        """The server answered (a refusal) or closed: no longer held open."""
        c.setblocking(False)
        try:
            c.recv(1)
            return True
        except BlockingIOError:
            return False
        except ConnectionResetError:
            return True

    cap = 32  # ops.limits.max_connections_per_client's default
    line = 'sentinel_ops_connections_refused_total{reason="max_connections_per_client"}'
    conns: list[socket.socket] = []
    try:
        for i in range(200):
            c = connect(f"127.0.0.{10 + i % 10}")
            c.sendall(b"GET /livez HTTP/1.1\r\nhost: x\r\nx-slow-%d: " % i)
            conns.append(c)
        one = [connect("127.0.0.99") for _ in range(50)]
        conns += one
        wait_for(
            lambda: f"{line} {float(len(one) - cap)}" in sp.get("/metrics").text,
            5,
            interval=0.1,
            what="the connections beyond the per-client cap counted",
        )
        assert sum(closed(c) for c in one) == len(one) - cap
        for c in conns[:200]:  # still trickling
            c.sendall(b"a")
        for path in ("/livez", "/readyz") * 3:
            r = httpx.get(sp.ops_url + path, timeout=1)  # the kubelet's default timeout
            assert r.status_code == 200, (path, r.text)
        assert not any(closed(c) for c in conns[:200])  # all still open
        r = sp.complete(base=sp.proxy_url)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None
    finally:
        for c in conns:
            c.close()


def test_stall_longer_than_the_window_restarts_with_reason_stalled(sentinel):
    sp, _ = sentinel
    gen_before = sp.status()["generation"]
    got_chunks = threading.Event()
    errors: list[BaseException] = []

    def long_stream() -> None:
        body = {
            "model": "tiny",
            "prompt": "hello",
            "max_tokens": 240,
            "ignore_eos": True,
            "stream": True,
            "temperature": 0,
        }
        try:
            with httpx.stream(
                "POST",
                sp.engine_url + "/v1/completions",
                json=body,
                timeout=httpx.Timeout(5, read=120),
            ) as r:
                for _ in r.iter_lines():
                    got_chunks.set()
        except httpx.HTTPError as exc:  # the restart cuts it off: expected
            errors.append(exc)

    roles = sp.engine_processes_by_role()
    pids = [p.pid for role in ("engine_core", "worker") for p in roles.get(role, [])]
    assert len(pids) >= 2, f"expected EngineCore and Worker, got {roles}"
    # several long streams, stopped at their first token: the tiny model writes 240 tokens
    # in about a second, so the stop must come at once for requests to be left running
    streams = [threading.Thread(target=long_stream, daemon=True) for _ in range(8)]
    for t in streams:
        t.start()
    assert got_chunks.wait(30), "no streamed tokens arrived"
    for pid in pids:  # mid-generation: running > 0, no tokens move
        os.kill(pid, signal.SIGSTOP)
    time.sleep(1.5)  # a few scrapes of the stopped engine
    running = sp.status().get("engine_metrics", {})

    def restarted() -> dict[str, Any] | None:
        doc = sp.status()
        return doc if doc["restart_counts"].get("stalled") else None

    doc = wait_for(
        restarted, 60, interval=0.5, what=f"a restart with reason stalled (engine: {running})"
    )
    record = [r for r in doc["restarts"] if r["reason"] == "stalled"][-1]
    assert record["generation"] == gen_before
    assert "no token generated" in record["detail"]
    # the supervisor kills the stopped tree (SIGKILL works on stopped processes)
    wait_gone(pids, 60)
    for t in streams:
        t.join(30)
    sp.wait_serving()
    wait_for(
        lambda: sp.get("/readyz").status_code == 200,
        60,
        interval=0.5,
        what="ready again after the restart",
    )
    after = sp.status()
    assert after["generation"] > gen_before and after["stalled_reason"] is None
    assert 'sentinel_engine_restarts_total{reason="stalled"} 1.0' in sp.get("/metrics").text
