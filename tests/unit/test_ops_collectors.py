"""Collectors built at scrape time, the loop heartbeat, and /status redaction."""

from __future__ import annotations

import os
import time

from prometheus_client import CollectorRegistry, generate_latest

from sentinel.collectors.process import ProcessCollector
from sentinel.collectors.sentinel_metrics import EngineStatusCollector
from sentinel.logs import REDACTED
from sentinel.ops.heartbeat import LoopMonitor
from sentinel.ops.report import redact_argv
from sentinel.state import EngineState, EngineStatus, ProbeResult, ProcessInfo


def render(*collectors) -> str:
    reg = CollectorRegistry(auto_describe=True)
    for c in collectors:
        reg.register(c)
    return generate_latest(reg).decode()


def test_engine_state_is_one_hot_and_follows_the_status():
    st = EngineStatus()
    st.new_generation()
    text = render(EngineStatusCollector(st))
    ones = [
        line
        for line in text.splitlines()
        if line.startswith("sentinel_engine_state{") and line.endswith(" 1.0")
    ]
    assert ones == ['sentinel_engine_state{state="starting"} 1.0']
    assert text.count("sentinel_engine_state{") == len(EngineState)
    st.mark_loaded()
    st.set_stalled("1 requests running and no token generated for 30s")
    text = render(EngineStatusCollector(st))
    assert 'sentinel_engine_state{state="stalled"} 1.0' in text
    assert "sentinel_engine_stalled 1.0" in text and "sentinel_engine_up 1.0" in text


def test_restarts_probes_and_zombies_are_exposed():
    st = EngineStatus()
    st.new_generation()
    st.record_restart("stalled", "x")
    st.record_restart("stalled", "y")
    st.record_restart("crashed")
    st.record_probe(ProbeResult("inference", True, time.time(), 0.012))
    st.record_probe(ProbeResult("inference", False, time.time(), 2.0, "timed out"))
    st.zombies_reaped = 4
    text = render(EngineStatusCollector(st))
    assert 'sentinel_engine_restarts_total{reason="stalled"} 2.0' in text
    assert 'sentinel_engine_restarts_total{reason="crashed"} 1.0' in text
    assert 'sentinel_probe_success{probe="inference"} 0.0' in text
    assert 'sentinel_probe_duration_seconds{probe="inference"} 2.0' in text
    assert 'sentinel_probe_runs_total{probe="inference",result="ok"} 1.0' in text
    assert 'sentinel_probe_runs_total{probe="inference",result="fail"} 1.0' in text
    assert "sentinel_zombies_reaped_total 4.0" in text


def test_process_collector_skips_gone_and_reused_pids():
    st = EngineStatus()
    me = os.getpid()
    st.set_processes(
        [
            ProcessInfo(pid=me, role="worker", generation=1, create_time=1.0),  # pid reused
            ProcessInfo(pid=2**22 + 12345, role="engine_core", generation=1, create_time=0),
        ]
    )
    collector = ProcessCollector(st)
    text = render(collector)
    assert f'sentinel_process_resident_memory_bytes{{pid="{me}",role="sentinel"}}' in text
    assert 'role="worker"' not in text and 'role="engine_core"' not in text
    assert f'sentinel_process_threads{{pid="{me}",role="sentinel"}}' in text
    assert "sentinel_process_cpu_seconds_total" in text
    assert "sentinel_process_open_fds" in text


def test_heartbeat_age_decides_liveness():
    t = [100.0]
    mon = LoopMonitor(period_s=0.25, clock=lambda: t[0])
    assert mon.alive(5)[0]
    t[0] += 0.75  # slept 0.25, woke 0.5 late
    mon.beat(100.0)
    assert abs(mon.lag_s - 0.5) < 1e-9
    t[0] += 4.9
    assert mon.alive(5)[0]
    t[0] += 0.2
    alive, info = mon.alive(5)
    assert not alive and info["heartbeat_age_s"] > 5


def test_status_config_hides_secret_arguments():
    argv = [
        "--max-model-len",
        "256",
        "--api-key",
        "abc123",
        "--hf-token=xyz789",
        "--model",
        "m",
        "Bearer sk-abcdefghijkl",
    ]
    out = redact_argv(argv)
    assert out[:4] == ["--max-model-len", "256", "--api-key", REDACTED]
    assert out[4] == f"--hf-token={REDACTED}"
    assert out[5:7] == ["--model", "m"]
    assert "sk-abcdefghijkl" not in out[7]


def test_worst_loop_lag_is_over_a_fixed_window_whoever_scrapes():
    """Two scrapers (an HA pair of Prometheus servers, or a curl between scrapes) both see a
    lag spike for the whole window; it leaves the max once it is older than the window."""
    from prometheus_client import CollectorRegistry, generate_latest

    t = [1000.0]
    mon = LoopMonitor(period_s=0.25, clock=lambda: t[0])
    registry = CollectorRegistry()
    registry.register(mon)

    def worst() -> float:
        for line in generate_latest(registry).decode().splitlines():
            if line.startswith("sentinel_event_loop_lag_max_seconds "):
                return float(line.split()[1])
        raise AssertionError("no sentinel_event_loop_lag_max_seconds")

    def beat(late: float) -> None:
        t0 = t[0]
        t[0] += 0.25 + late
        mon.beat(t0)

    beat(0.01)
    beat(2.0)  # a 2 s stall
    for _ in range(40):
        beat(0.01)
    assert worst() == 2.0  # scraper A
    assert worst() == 2.0  # scraper B, right after
    assert abs(mon.lag_s - 0.01) < 1e-9
    assert "last 60 seconds" in generate_latest(registry).decode()
    while t[0] < 1000.0 + 64:
        beat(0.01)
    assert abs(worst() - 0.01) < 1e-9  # the spike is older than the window
