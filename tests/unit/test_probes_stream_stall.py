"""Issue 15: a stream from the local engine that sends nothing mid-stream for
``proxy.stream_idle_timeout_s`` feeds stall detection: the stall math, the probe runner
(readiness, the counter, on_stall), and the proxy's wiring (the local tier only)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from sentinel.collectors.sentinel_metrics import EngineStatusCollector
from sentinel.config.schema import PayloadLogConfig, ProxyConfig
from sentinel.probes.progress import StallDetector
from sentinel.proxy.service import ProxyService, local_only
from sentinel.state import EngineStatus, Lifecycle
from tests.fake_openai import FakeOpenAI
from tests.helpers import wait_for
from tests.unit.fake_engine import vllm_metrics
from tests.unit.proxy_harness import ProxyHarness
from tests.unit.test_probes_runner import Clock, in_loop, make

REASON = "stream_stalled: test"


@pytest.fixture(autouse=True)
def _reset(engine):
    engine.mode.update(delay=0.0, status=None, metrics=vllm_metrics(), metrics_status=200)
    engine.requests.clear()


# ---- stall math ------------------------------------------------------------------------------
def test_a_frozen_engines_idle_stream_is_a_stall_at_once_until_tokens_move() -> None:
    d = StallDetector(window_s=30)
    d.observe(0, running=1, tokens=100)
    d.observe(2, running=1, tokens=100)  # frozen since about 0
    assert d.stream_idle(3, idle_s=3, reason=REASON) == REASON  # long before the 30 s window
    assert d.stalled_since == 3
    assert d.observe(4, running=1, tokens=100) == REASON  # stands while nothing moves
    assert d.observe(6, running=0, tokens=100) == REASON  # the client gone: still frozen
    assert d.stalled_since == 3
    assert d.observe(8, running=1, tokens=104) is None  # tokens move again
    assert d.stalled_since is None and d.stream_stalled is None


def test_an_engine_whose_metrics_stopped_answering_is_stalled_by_an_idle_stream() -> None:
    d = StallDetector(window_s=30)
    d.observe(0, running=1, tokens=100)
    d.observe(2, running=1, tokens=180)  # moved, but before the stream's 3 s wait began
    # no scrape since (the API server froze with the engine): the stream is the evidence
    assert d.stream_idle(6, idle_s=3, reason=REASON) == REASON
    assert d.stream_idle(7, idle_s=3, reason=REASON) == REASON


def test_an_idle_stream_while_tokens_move_waits_for_the_next_scrape() -> None:
    """One request starved on a busy engine (other streams progress) is not a frozen
    engine: the next scrape decides."""
    d = StallDetector(window_s=30)
    d.observe(0, running=4, tokens=100)
    d.observe(2, running=4, tokens=300)  # moved within the stream's 30 s wait
    assert d.stream_idle(3, idle_s=30, reason=REASON) is None
    assert d.stalled_since is None
    assert d.observe(4, running=4, tokens=500) is None  # still moving: no stall
    assert d.stream_stalled is None
    # the same, but the next scrape shows the engine froze meanwhile
    assert d.stream_idle(5, idle_s=30, reason=REASON) is None
    assert d.observe(6, running=4, tokens=500) == REASON
    assert d.stalled_since == 6


def test_reset_forgets_a_stream_stall() -> None:
    d = StallDetector(window_s=30)
    assert d.stream_idle(1, idle_s=3, reason=REASON) == REASON
    d.reset()  # a new engine generation
    assert d.observe(2, running=1, tokens=0) is None and d.stalled_since is None


# ---- the probe runner ------------------------------------------------------------------------
def _metric(status, name: str) -> float | None:
    reg = CollectorRegistry()
    reg.register(EngineStatusCollector(status))
    for line in generate_latest(reg).decode().splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_a_local_stream_idle_fails_readiness_counts_and_restarts_sooner(engine) -> None:
    clock = Clock()
    status, control, runner = make(
        engine,
        clock,
        stall_window_s=30,
        on_stall="restart",
        stall_restart_after_s=5,
        freshness_s=100,
    )
    status.new_generation()

    async def go() -> None:
        await runner.probe_once()  # loaded, running
        engine.mode["metrics"] = vllm_metrics(running=1, generation=500)
        await runner.scrape_once()
        clock.advance(2)
        await runner.scrape_once()  # frozen: nothing moved
        assert runner.readiness_report()[0]
        assert _metric(status, "sentinel_engine_stream_stalls_total") == 0
        clock.advance(1)
        runner.local_stream_idle(3.0)
        ready, body = runner.readiness_report()
        assert not ready and body["failed"] == ["progress"]
        assert "stream_stalled" in body["checks"]["progress"]["detail"]
        assert body["state"] == "stalled"
        assert _metric(status, "sentinel_engine_stream_stalls_total") == 1
        assert _metric(status, "sentinel_engine_stalled") == 1
        clock.advance(2)
        await runner.scrape_once()  # still frozen: the stall stands (30 s window not over)
        assert status.stalled_reason and "stream_stalled" in status.stalled_reason
        runner.apply_actions()
        assert control.restarts == []
        clock.advance(3)  # stall_restart_after_s after the stream's word, not after 30 s + 5 s
        runner.apply_actions()
        assert [r for r, _ in control.restarts] == ["stalled"]
        assert "stream_stalled" in control.restarts[0][1]

    in_loop(runner, go)


def test_tokens_moving_again_clear_a_stream_stall(engine) -> None:
    clock = Clock()
    status, control, runner = make(engine, clock, stall_window_s=30, freshness_s=100)
    status.new_generation()

    async def go() -> None:
        await runner.probe_once()
        engine.mode["metrics"] = vllm_metrics(running=1, generation=500)
        await runner.scrape_once()
        clock.advance(5)
        runner.local_stream_idle(3.0)
        assert not runner.readiness_report()[0]
        engine.mode["metrics"] = vllm_metrics(running=1, generation=501)
        clock.advance(1)
        await runner.scrape_once()
        ready, body = runner.readiness_report()
        assert ready, body
        assert status.stalled_reason is None
        assert control.restarts == []  # on_stall: report by default

    in_loop(runner, go)


def test_an_answered_probe_clears_a_stream_stall_of_an_engine_without_counters(engine) -> None:
    """An engine that exports no token counters: the next answered inference probe is
    the evidence that it generates again."""
    clock = Clock()
    status, _, runner = make(engine, clock, freshness_s=100)
    status.new_generation()
    engine.mode["metrics"] = "# no vllm series here\n"

    async def go() -> None:
        await runner.probe_once()
        await runner.scrape_once()
        runner.local_stream_idle(3.0)
        assert not runner.readiness_report()[0]
        assert "stream_stalled" in (status.stalled_reason or "")
        await runner.scrape_once()  # no counters: says nothing either way
        assert "stream_stalled" in (status.stalled_reason or "")
        await runner.probe_once()  # answered
        assert status.stalled_reason is None
        assert runner.readiness_report()[0]

    in_loop(runner, go)


def test_a_stream_idle_outside_a_running_generation_is_ignored(engine) -> None:
    clock = Clock()
    status, _, runner = make(engine, clock)
    status.new_generation()  # starting, not running
    runner.local_stream_idle(3.0)
    assert status.stalled_reason is None and status.stream_stalls == 0
    status.set_lifecycle(Lifecycle.draining)
    runner.local_stream_idle(3.0)
    assert status.stalled_reason is None and status.stream_stalls == 0
    asyncio.run(runner.aclose())


# ---- the proxy's wiring ----------------------------------------------------------------------
def _silent_stream(h: ProxyHarness) -> dict:
    body = {"model": "m", "prompt": "hi", "max_tokens": 3, "stream": True}
    with httpx.stream(
        "POST", h.url + "/v1/completions", json=body, headers={"x-fake-chunk-interval": "5"}
    ) as r:
        return {"lines": [x for x in r.iter_lines() if x.startswith("data: ")]}


def test_only_the_local_tiers_idle_streams_reach_stall_detection(tmp_path: Path) -> None:
    """The local engine's silent stream is told (with the limit); a silent stream of
    another tier (a slow external API) is not: it says nothing about the engine."""
    told: list[float] = []
    with FakeOpenAI("local") as local_up, FakeOpenAI("backup") as other_up:
        local = {
            "tiers": [{"name": "local", "kind": "local"}],
            "stream_idle_timeout_s": 0.5,
        }
        with ProxyHarness(local, tmp_path / "a", engine_url=local_up.url) as h:
            assert h.service is not None
            h.service.handler.on_stream_idle = local_only(told.append)  # as ProxyService does
            t0 = time.monotonic()
            out = _silent_stream(h)
            assert "stream_idle_timeout" in out["lines"][-1]
            wait_for(lambda: told, 5, what="the local stream's idle reported")
            assert told == [0.5] and time.monotonic() - t0 < 4
        other = {
            "tiers": [{"name": "backup", "base_url": other_up.url}],
            "stream_idle_timeout_s": 0.5,
        }
        told.clear()
        with ProxyHarness(other, tmp_path / "b") as h:
            assert h.service is not None
            h.service.handler.on_stream_idle = local_only(told.append)
            out = _silent_stream(h)
            assert "stream_idle_timeout" in out["lines"][-1]
            assert h.metric("sentinel_proxy_stream_idle_timeouts_total", tier="backup") == 1
        assert told == []


def test_the_proxy_service_hands_the_handler_a_local_only_callback(tmp_path: Path) -> None:
    """What the app wires: ``ProxyService(on_local_stream_idle=...)``."""
    told: list[float] = []
    cfg = ProxyConfig(
        host="127.0.0.1",
        port=0,
        tiers=[
            {"name": "local", "kind": "local"},
            {"name": "backup", "base_url": "http://127.0.0.1:9"},
        ],
    )
    svc = ProxyService(
        cfg,
        PayloadLogConfig(enabled=False, dir=tmp_path),
        EngineStatus(),
        CollectorRegistry(),
        engine_base_url=lambda: "http://127.0.0.1:9",
        on_local_stream_idle=told.append,
    )
    on_idle = svc.handler.on_stream_idle
    assert on_idle is not None
    local, backup = svc.chain.tiers
    on_idle(backup, 30.0)
    on_idle(local, 30.0)
    assert told == [30.0]


def test_many_idle_streams_while_tokens_move_are_counted_but_logged_once(engine, capsys) -> None:
    """Idle streams on a busy engine are a client's to cause (many starved requests): each
    is counted, the line is logged once per window, so they cannot flush the log ring."""
    clock = Clock()
    status, _, runner = make(engine, clock, stall_window_s=30, freshness_s=100)
    status.new_generation()

    async def go() -> None:
        await runner.probe_once()
        engine.mode["metrics"] = vllm_metrics(running=4, generation=500)
        await runner.scrape_once()
        clock.advance(1)
        engine.mode["metrics"] = vllm_metrics(running=4, generation=900)
        await runner.scrape_once()  # tokens moved
        capsys.readouterr()
        for _ in range(200):
            runner.local_stream_idle(3.0)
        assert status.stalled_reason is None
        assert _metric(status, "sentinel_engine_stream_stalls_total") == 200

    in_loop(runner, go)
    assert capsys.readouterr().out.count("local stream idle while tokens moved") == 1
