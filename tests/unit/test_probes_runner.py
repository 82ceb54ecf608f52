"""Stall math, readiness checks and the probe runner's actions, against a fake engine."""

from __future__ import annotations

import asyncio
import time

import pytest

from sentinel.config.schema import EngineConfig, ProbesConfig
from sentinel.probes.progress import StallDetector
from sentinel.probes.readiness import evaluate_readiness
from sentinel.probes.runner import ProbeRunner
from sentinel.state import EngineStatus, Lifecycle, ProbeResult
from tests.unit.fake_engine import vllm_metrics


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


class Control:
    """Stands in for the supervisor."""

    def __init__(self, url: str) -> None:
        self.engine_base_url = url
        self.restarts: list[tuple[str, str]] = []

    def request_restart(self, reason: str, detail: str = "") -> None:
        self.restarts.append((reason, detail))


@pytest.fixture(autouse=True)
def _reset(engine):
    engine.mode.update(delay=0.0, status=None, metrics=vllm_metrics(), metrics_status=200)
    engine.requests.clear()


def make(engine, clock, **probe_cfg):
    status = EngineStatus(clock=clock)
    control = Control(engine.url)
    cfg = ProbesConfig(
        **{
            "interval_s": 0.1,
            "timeout_s": 0.5,
            "freshness_s": 5.0,
            "metrics_interval_s": 0.1,
            "stall_window_s": 10.0,
            **probe_cfg,
        }
    )
    runner = ProbeRunner(cfg, EngineConfig(served_model_name="tiny"), status, control, clock=clock)
    return status, control, runner


def in_loop(runner, fn):
    """Run fn(runner) -> coroutine on one event loop, closing the runner's client after."""

    async def go():
        try:
            return await fn()
        finally:
            await runner.aclose()

    return asyncio.run(go())


# ---- stall math ------------------------------------------------------------------
def test_stall_needs_running_requests_and_no_tokens_for_the_whole_window():
    d = StallDetector(window_s=10)
    assert d.observe(0, running=2, tokens=100) is None
    assert d.observe(9.9, running=2, tokens=100) is None
    reason = d.observe(10, running=2, tokens=100)
    assert reason and "2 requests running" in reason
    assert d.stalled_since == 10
    assert d.observe(15, running=2, tokens=100) == reason  # stays, stable text
    assert d.stalled_since == 10
    assert d.observe(16, running=2, tokens=101) is None  # a token moved
    assert d.stalled_since is None


def test_idle_engine_is_never_stalled():
    d = StallDetector(window_s=1)
    for t in range(0, 100, 5):
        assert d.observe(t, running=0, tokens=100) is None


def test_window_starts_when_requests_start_running():
    d = StallDetector(window_s=10)
    d.observe(0, running=0, tokens=5)
    d.observe(50, running=0, tokens=5)
    assert d.observe(55, running=1, tokens=5) is None  # idle until 50
    assert d.observe(60, running=1, tokens=5) is not None


def test_counter_reset_after_restart_is_progress_not_a_stall():
    d = StallDetector(window_s=10)
    d.observe(0, running=1, tokens=1000)
    assert d.observe(8, running=1, tokens=3) is None  # engine restarted: counter dropped
    assert d.observe(17, running=1, tokens=3) is None  # window counts from the reset
    assert d.observe(18, running=1, tokens=3) is not None


# ---- readiness checks ------------------------------------------------------------
def loaded_status(clock: Clock) -> EngineStatus:
    st = EngineStatus(clock=clock)
    st.new_generation()
    st.mark_loaded()
    return st


def test_ready_when_every_check_holds():
    clock = Clock()
    st = loaded_status(clock)
    st.record_probe(ProbeResult("inference", True, clock(), 0.01))
    ready, checks = evaluate_readiness(st, ProbesConfig(freshness_s=10), clock())
    assert ready, checks
    assert set(checks) == {"lifecycle", "loaded", "inference_probe", "progress"}


def test_probe_older_than_freshness_fails_readiness():
    clock = Clock()
    st = loaded_status(clock)
    st.record_probe(ProbeResult("inference", True, clock(), 0.01))
    clock.advance(10.5)
    ready, checks = evaluate_readiness(st, ProbesConfig(freshness_s=10), clock())
    assert not ready
    assert not checks["inference_probe"]["ok"]
    assert "older than freshness_s=10" in checks["inference_probe"]["detail"]
    assert all(c["ok"] for k, c in checks.items() if k != "inference_probe")


def test_failed_probe_stalled_and_lifecycle_each_fail_their_check():
    clock = Clock()
    st = loaded_status(clock)
    st.record_probe(ProbeResult("inference", False, clock(), 3.0, "timed out after 3s"))
    st.set_stalled("1 requests running and no token generated for 30s")
    st.set_lifecycle(Lifecycle.draining)
    ready, checks = evaluate_readiness(st, ProbesConfig(), clock())
    assert not ready
    assert "timed out" in checks["inference_probe"]["detail"]
    assert "stalled" in checks["progress"]["detail"]
    assert checks["lifecycle"]["detail"] == "engine is draining"


def test_not_loaded_generation_is_not_ready():
    clock = Clock()
    st = EngineStatus(clock=clock)
    st.new_generation()
    ready, checks = evaluate_readiness(st, ProbesConfig(), clock())
    assert not ready and not checks["loaded"]["ok"] and not checks["lifecycle"]["ok"]


# ---- the runner ------------------------------------------------------------------
def test_first_successful_probe_marks_the_generation_loaded(engine):
    clock = Clock()
    status, _, runner = make(engine, clock)
    status.new_generation()

    async def go():
        started, body = runner.startup_report()
        assert not started and "loading" in body["reason"]
        engine.mode["status"] = 503
        await runner.probe_once()
        assert not status.loaded
        assert "HTTP 503" in runner.startup_report()[1]["last_probe"]
        engine.mode["status"] = None
        await runner.probe_once()
        assert status.loaded and status.lifecycle == Lifecycle.running
        started, body = runner.startup_report()
        assert started and body["generation"] == 1
        ready, body = runner.readiness_report()
        assert ready and body["failed"] == []

    in_loop(runner, go)


def test_result_of_a_probe_from_a_replaced_generation_is_dropped(engine):
    clock = Clock()
    status, control, runner = make(engine, clock)
    status.new_generation()
    engine.mode["delay"] = 0.3

    async def go():
        task = asyncio.create_task(runner.probe_once())
        await asyncio.sleep(0.1)
        status.new_generation()  # the supervisor replaced the engine meanwhile
        assert await task is None
        assert not status.loaded and status.probes == {}

    in_loop(runner, go)


def test_stall_is_detected_from_engine_metrics_and_leads_to_restart(engine):
    clock = Clock()
    status, control, runner = make(
        engine,
        clock,
        stall_window_s=10,
        on_stall="restart",
        stall_restart_after_s=5,
        freshness_s=100,
    )
    status.new_generation()

    async def go():
        await runner.probe_once()
        engine.mode["metrics"] = vllm_metrics(running=2, generation=500)
        for _ in range(3):
            await runner.scrape_once()
            clock.advance(4)
        await runner.scrape_once()  # 12 s of no tokens with 2 running
        assert status.stalled_reason and "2 requests running" in status.stalled_reason
        assert status.engine_metrics["vllm:num_requests_running"] == 2
        ready, body = runner.readiness_report()
        assert not ready and body["failed"] == ["progress"]
        runner.apply_actions()
        assert control.restarts == []  # stall_restart_after_s not over yet
        clock.advance(5)
        await runner.scrape_once()
        runner.apply_actions()
        runner.apply_actions()  # asked once per generation
        assert len(control.restarts) == 1
        reason, detail = control.restarts[0]
        assert reason == "stalled" and "no token generated" in detail

    in_loop(runner, go)


def test_a_hung_engine_whose_running_gauge_froze_at_zero_is_stalled_by_the_probe(engine):
    """vLLM's running gauge comes from the engine core: stopped before it counted the
    requests just given to it, the engine shows 0 running with frozen counters. The
    inference probe, unanswered, is a running request of Sentinel's own."""
    clock = Clock()
    status, control, runner = make(
        engine,
        clock,
        stall_window_s=10,
        on_stall="restart",
        stall_restart_after_s=0,
        timeout_s=1.0,
        freshness_s=100,
    )
    status.new_generation()

    async def go():
        assert (await runner.probe_once()).ok  # the engine has answered once
        engine.mode["metrics"] = vllm_metrics(running=0, generation=500)
        engine.mode["delay"] = 5.0  # hung: probes time out
        await runner.scrape_once()
        for _ in range(3):
            result = await runner.probe_once()
            assert result is not None and "timed out" in result.detail
            clock.advance(4)
            await runner.scrape_once()
        assert status.stalled_reason and "1 requests running" in status.stalled_reason
        runner.apply_actions()
        assert [r for r, _ in control.restarts] == ["stalled"]

    in_loop(runner, go)


def test_an_answering_engine_with_frozen_counters_and_no_requests_is_not_stalled(engine):
    clock = Clock()
    status, _, runner = make(engine, clock, stall_window_s=10, timeout_s=5.0)  # never hung
    status.new_generation()

    async def go():
        assert (await runner.probe_once()).ok
        engine.mode["metrics"] = vllm_metrics(running=0, generation=500)  # idle
        for _ in range(4):
            assert (await runner.probe_once()).ok  # answered (counters here are canned)
            clock.advance(4)
            await runner.scrape_once()
        assert status.stalled_reason is None

    in_loop(runner, go)


def test_a_loading_engine_that_times_the_probe_out_is_not_stalled(engine):
    clock = Clock()
    status, _, runner = make(engine, clock, stall_window_s=10, timeout_s=1.0)
    status.new_generation()
    status.set_lifecycle(Lifecycle.running)  # /health answers; no inference has yet

    async def go():
        engine.mode["metrics"] = vllm_metrics(running=0, generation=0)
        engine.mode["delay"] = 5.0  # no probe has ever been answered: still loading
        for _ in range(4):
            await runner.probe_once()
            clock.advance(4)
            await runner.scrape_once()
        assert runner.first_inference_at is None and status.stalled_reason is None

    in_loop(runner, go)


def test_a_probe_timed_out_behind_the_engines_own_load_is_busy_not_a_failure(engine):
    """Under a burst the probe's completion waits behind the engine's own requests: when
    tokens were computed while it waited, the engine is busy and stays ready (the probe
    passes, saying so); with no tokens computed, the timeout stands."""
    clock = Clock()
    status, _, runner = make(engine, clock, timeout_s=1.0, freshness_s=100)
    status.new_generation()

    async def go():
        assert (await runner.probe_once()).ok
        engine.mode["metrics"] = vllm_metrics(running=8, generation=500)
        engine.mode["delay"] = 5.0  # the probe waits behind 8 long requests
        later = vllm_metrics(running=8, generation=900)  # while tokens flow
        asyncio.get_running_loop().call_later(0.1, engine.mode.update, {"metrics": later})
        busy = await runner.probe_once()
        assert busy is not None and busy.ok and "busy" in busy.detail, busy
        ready, checks = runner.evaluate()
        assert ready and "400 tokens" in checks["inference_probe"]["detail"], checks
        hung = await runner.probe_once()  # counters frozen at 900 since the last look
        assert hung is not None and not hung.ok and "timed out" in hung.detail, hung
        ready, checks = runner.evaluate()
        assert not ready and "timed out" in checks["inference_probe"]["detail"]

    in_loop(runner, go)


def test_stall_report_only_never_restarts(engine):
    clock = Clock()
    status, control, runner = make(engine, clock, stall_window_s=1)  # on_stall: report
    status.new_generation()

    async def go():
        await runner.probe_once()
        engine.mode["metrics"] = vllm_metrics(running=1, generation=7)
        for _ in range(5):
            await runner.scrape_once()
            clock.advance(1)
            runner.apply_actions()
        assert status.stalled_reason
        assert control.restarts == []

    in_loop(runner, go)


def test_new_generation_resets_stall_and_counters(engine):
    clock = Clock()
    status, control, runner = make(engine, clock, stall_window_s=5)
    status.new_generation()

    async def go():
        await runner.probe_once()
        engine.mode["metrics"] = vllm_metrics(running=1, generation=900)
        for _ in range(4):
            await runner.scrape_once()
            clock.advance(3)
        assert status.stalled_reason
        status.new_generation()  # restarted: new engine, counters start from 0 again
        assert status.stalled_reason is None
        await runner.probe_once()
        engine.mode["metrics"] = vllm_metrics(running=1, generation=2)
        await runner.scrape_once()
        clock.advance(3)
        engine.mode["metrics"] = vllm_metrics(running=1, generation=4)
        await runner.scrape_once()
        assert status.stalled_reason is None
        assert status.engine_metrics["vllm:generation_tokens_total"] == 4

    in_loop(runner, go)


def test_not_ready_for_long_enough_restarts_with_reason(engine):
    clock = Clock()
    status, control, runner = make(
        engine, clock, on_not_ready="restart", not_ready_restart_after_s=30, timeout_s=1.0
    )
    status.new_generation()

    async def go():
        await runner.probe_once()
        assert runner.evaluate()[0]
        engine.mode["delay"] = 5.0  # hung engine
        await runner.probe_once()
        assert not runner.evaluate()[0]
        clock.advance(29)
        runner.evaluate()
        runner.apply_actions()
        assert control.restarts == []
        clock.advance(2)
        runner.evaluate()
        runner.apply_actions()
        assert [r for r, _ in control.restarts] == ["not_ready"]
        assert "inference_probe" in control.restarts[0][1]

    in_loop(runner, go)


def test_metrics_scrape_failures_are_survived(engine):
    clock = Clock()
    status, _, runner = make(engine, clock)
    status.new_generation()

    async def go():
        await runner.probe_once()
        engine.mode["metrics_status"] = 500
        await runner.scrape_once()
        assert not runner.scraper.last_ok and runner.scraper.failures_total == 1
        garbage = "\x00garbage\nvllm:broken{{{ 1\nvllm:num_requests_running 1\n"
        engine.mode.update(metrics_status=200, metrics=garbage)
        await runner.scrape_once()
        assert runner.scraper.last_ok and runner.scraper.parse_errors_total >= 1
        assert status.engine_metrics == {"vllm:num_requests_running": 1.0}
        assert status.stalled_reason is None  # no token counter: no stall verdict

    in_loop(runner, go)


def test_runner_tasks_track_a_hanging_engine_in_real_time(engine):
    """The loops together: ready, then a hung engine turns not ready within timeout+interval."""
    status, _, runner = make(engine, clock=time.time, timeout_s=0.3)
    status.new_generation()

    async def wait(pred, seconds):
        for _ in range(int(seconds / 0.05)):
            if pred():
                return True
            await asyncio.sleep(0.05)
        return pred()

    async def go():
        task = asyncio.create_task(runner.run())
        try:
            assert await wait(lambda: status.ready, 3), status.ready_checks
            engine.mode["delay"] = 2.0
            assert await wait(lambda: not status.ready, 2)
            assert status.ready_checks["inference_probe"]["ok"] is False
            engine.mode["delay"] = 0.0
            assert await wait(lambda: status.ready, 3), status.ready_checks
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    in_loop(runner, go)


def test_a_success_goes_stale_only_once_no_probe_sent_in_time_awaits_its_answer(engine):
    """A probe queued behind a burst: the last success ages past freshness_s while the
    next probe, sent in time, still waits for its answer. Readiness holds until that
    probe's own verdict (here a timeout with no tokens computed: not ready). Seen in a
    fresh-clone run: /readyz flipped for 30 ms mid-burst and requests skipped the engine."""
    clock = Clock()
    status, _, runner = make(engine, clock, timeout_s=1.0, freshness_s=5.0)
    status.new_generation()

    async def go():
        assert (await runner.probe_once()).ok
        engine.mode["delay"] = 5.0  # the next probe waits (longer than its timeout)
        clock.advance(4)  # sent while the success is fresh
        pending = asyncio.ensure_future(runner.probe_once())
        await asyncio.sleep(0.3)  # it is in flight
        clock.advance(2)  # the success is now 6 s old, past freshness_s
        ready, checks = runner.evaluate()
        assert ready, checks
        assert "waiting for its answer" in checks["inference_probe"]["detail"], checks
        timed_out = await pending
        assert timed_out is not None and not timed_out.ok
        ready, checks = runner.evaluate()
        assert not ready and "timed out" in checks["inference_probe"]["detail"], checks

    in_loop(runner, go)


def test_a_probe_sent_after_the_success_went_stale_does_not_hold_readiness() -> None:
    clock = Clock()
    st = loaded_status(clock)
    st.record_probe(ProbeResult("inference", True, clock(), 0.01))
    clock.advance(12)
    cfg = ProbesConfig(freshness_s=10)
    ready, checks = evaluate_readiness(st, cfg, clock(), probe_sent_at=clock() - 0.5)
    assert not ready and "older than freshness_s" in checks["inference_probe"]["detail"]
    ready, _ = evaluate_readiness(st, cfg, clock(), probe_sent_at=clock() - 3)  # sent at 9 s
    assert ready
