"""Watchdogs with fakes and plain Python children: the agent's reports (pauses per
role, over-limit counted, fork, failure disables it, chained sitecustomize, hostile
datagrams), the Theil-Sen trend, the leak and stuck rules."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
from prometheus_client import CollectorRegistry

from sentinel import agent
from sentinel.config.schema import (
    LeakWatchdogConfig,
    StuckWatchdogConfig,
    WatchdogsConfig,
)
from sentinel.state import EngineStatus, Lifecycle, ProcessInfo
from sentinel.watchdogs.gcwatch import GcWatch
from sentinel.watchdogs.leak import LeakWatch
from sentinel.watchdogs.metrics import WatchdogMetrics
from sentinel.watchdogs.stuck import StuckWatch
from sentinel.watchdogs.trend import format_duration, theil_sen

PAUSES = """
import gc, os, time
junk = [[i] for i in range(600000)]
for _ in range(2):
    gc.collect()
pid = os.fork()
if pid == 0:
    gc.collect()
    time.sleep(1.5)
    os._exit(0)
os.waitpid(pid, 0)
time.sleep(1.2)
print("done", flush=True)
"""


def run_with_agent(
    code: str,
    cfg: WatchdogsConfig,
    extra_env: dict[str, str] | None = None,
    roles: dict[int, str] | None = None,
):
    registry = CollectorRegistry()
    metrics = WatchdogMetrics(registry)
    roles = {} if roles is None else roles
    watch = GcWatch(cfg, metrics, lambda: roles)

    async def main() -> subprocess.CompletedProcess[str]:
        watch.start(asyncio.get_running_loop())
        env = dict(os.environ)
        env.update(extra_env or {})
        assert watch.socket_path
        agent.inject(env, cfg.agent, watch.socket_path)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        roles[proc.pid] = "api_server"
        out, err = await proc.communicate()
        await asyncio.sleep(0.3)
        watch.tick()
        return subprocess.CompletedProcess([], proc.returncode or 0, out.decode(), err.decode())

    try:
        done = asyncio.run(main())
    finally:
        watch.close()
    return watch, registry, done


def test_agent_reports_pauses_per_role_and_counts_those_over_the_limit() -> None:
    cfg = WatchdogsConfig(gc={"pause_limit_s": 0.005}, agent={"report_interval_s": 0.3})
    watch, registry, done = run_with_agent(PAUSES, cfg)
    assert done.returncode == 0 and "done" in done.stdout, done.stderr
    get = registry.get_sample_value
    assert get("sentinel_gc_pause_seconds_count", {"role": "api_server", "gc_generation": "2"}) >= 2
    assert get("sentinel_gc_pauses_over_limit_total", {"role": "api_server"}) >= 1
    pids = {p["pid"] for p in watch.describe()["processes"]}
    assert len(pids) == 2  # the forked child reports on its own
    child = next(p for p in watch.describe()["processes"] if p["role"] != "api_server")
    assert child["pauses"] >= 1 and child["disabled"] is None
    # Sentinel's own collections are in the same histogram
    import gc

    gc.collect()


def test_agent_failing_disables_itself_and_the_program_runs_on() -> None:
    cfg = WatchdogsConfig(agent={"report_interval_s": 0.3})
    for mode in ("callback", "import"):
        watch, registry, done = run_with_agent(
            PAUSES,
            cfg,
            {"SENTINEL_AGENT_TEST_CONTROL": "/nonexistent", "SENTINEL_AGENT_TEST_FAIL": mode},
        )
        assert done.returncode == 0 and "done" in done.stdout
        assert done.stderr.count("sentinel agent disabled") == 1, done.stderr
        disabled = [p for p in watch.describe()["processes"] if p["disabled"]]
        assert disabled and "on purpose" in disabled[0]["disabled"]
        assert registry.get_sample_value("sentinel_watchdog_agent_up", {"role": "api_server"}) == 0


# A thread of the parent is blocked writing to sys.stderr (a pipe nobody reads: the
# reader is slow) when the process forks, as vLLM forks its Worker from EngineCore: the
# child inherits that stream's lock held by a thread it does not have.
FORK_WITH_STDERR_HELD = """
import gc, os, signal, sys, threading, time
r, w = os.pipe()  # never read
sys.stderr = open(w, "w", buffering=1)
threading.Thread(target=lambda: sys.stderr.write("x" * (1 << 20)), daemon=True).start()
time.sleep(0.3)
pid = os.fork()
if pid == 0:
    signal.alarm(10)  # a hung child dies of SIGALRM
    gc.collect()  # the agent's callback fails on purpose: it disables itself and says so
    os.write(1, b"child done\\n")
    os._exit(0)
_, st = os.waitpid(pid, 0)
os.write(1, f"child status {st}\\n".encode())
os._exit(0)
"""


def test_a_failing_agent_never_blocks_on_a_stderr_lock_inherited_through_fork() -> None:
    """The agent's disable path writes its message on file descriptor 2, never through
    sys.stderr: a Worker forked while another thread held sys.stderr's lock would hang
    on its first collection (seen as a Worker silent at start-up for minutes when the
    machine was busy and Sentinel read the engine's output slowly)."""
    cfg = WatchdogsConfig(agent={"report_interval_s": 0.3, "gc_thresholds": [1000000, 10, 10]})
    _, _, done = run_with_agent(
        FORK_WITH_STDERR_HELD,
        cfg,
        {"SENTINEL_AGENT_TEST_CONTROL": "/nonexistent", "SENTINEL_AGENT_TEST_FAIL": "callback"},
    )
    assert "child done" in done.stdout and "child status 0" in done.stdout, done
    assert "sentinel agent disabled in pid" in done.stderr, done.stderr


def test_failure_hook_is_inert_without_the_test_control_variable() -> None:
    cfg = WatchdogsConfig(agent={"report_interval_s": 0.3})
    watch, _, done = run_with_agent(PAUSES, cfg, {"SENTINEL_AGENT_TEST_FAIL": "import"})
    assert done.returncode == 0 and "disabled" not in done.stderr
    assert all(p["disabled"] is None for p in watch.describe()["processes"])


def test_existing_sitecustomize_still_runs_and_gc_settings_apply(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text("import builtins\nbuiltins.P17_HOST_SITE = 1\n")
    cfg = WatchdogsConfig(agent={"report_interval_s": 0.2, "gc_thresholds": [1234, 11, 12]})
    code = (
        "import builtins, gc, time\n"
        "print(builtins.P17_HOST_SITE, gc.get_threshold())\n"
        "time.sleep(0.6)"
    )
    _, _, done = run_with_agent(code, cfg, {"PYTHONPATH": str(tmp_path)})
    assert done.stdout.strip() == "1 (1234, 11, 12)", done.stderr


def test_hostile_datagrams_are_dropped_and_cannot_invent_roles() -> None:
    metrics = WatchdogMetrics(CollectorRegistry())
    watch = GcWatch(WatchdogsConfig(), metrics, lambda: {10: "worker"})
    for data in (
        b"not json",
        b"[]",
        b'{"t":"report"}',
        b'{"t":"report","pid":10,"pauses":[[7,1,1]]}',
        b'{"t":"report","pid":10,"pauses":[[0,-1,0]]}',
        b"[" * 3000,  # deeper than Python's parser goes
    ):
        watch.handle(data)
    assert watch.dropped["malformed"] == 6
    watch.handle(b'{"t":"report","pid":11,"hint":"evil role","pauses":[[0,0.001,3]]}')
    watch.handle(b'{"t":"report","pid":10,"hint":"api_server","pauses":[[2,0.002,0]]}')
    roles = {p["pid"]: p["role"] for p in watch.describe()["processes"]}
    assert roles == {10: "worker", 11: "other"}


def test_theil_sen_ignores_sawtooth_and_spikes() -> None:
    rate = 1000.0  # bytes/s
    pts = []
    for i in range(120):
        t = i * 10.0
        y = 1e9 + rate * t + (5e6 if i % 7 == 0 else 0) - (3e6 if i % 5 == 0 else 0)
        pts.append((t, y))
    pts[50] = (pts[50][0], 5e9)  # one wild spike
    slope = theil_sen(pts)
    assert slope is not None and abs(slope - rate) / rate < 0.05
    assert theil_sen(pts[:2]) is None
    assert format_duration(math.inf).startswith("never") and format_duration(3725) == "1h02m"


def _status_with(pid: int, role: str) -> EngineStatus:
    st = EngineStatus()
    st.new_generation()
    st.mark_loaded()
    st.set_processes([ProcessInfo(pid, role, 1, psutil.Process(pid).create_time())])
    return st


def test_leak_watch_rate_and_time_to_limit_from_a_growing_process() -> None:
    code = (
        "import time\nhold=[]\nend=time.monotonic()+3.0\n"
        "while time.monotonic()<end:\n hold.append(bytearray(b'x')*2_000_000); time.sleep(0.1)\n"
        "time.sleep(30)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        registry = CollectorRegistry()
        restarts: list[tuple[str, str]] = []
        ct = psutil.Process(proc.pid).create_time()
        watch = LeakWatch(
            LeakWatchdogConfig(
                interval_s=0.2,
                window_s=60,
                min_samples=5,
                growth_limit_bytes_per_hour=1e9,
            ),
            WatchdogMetrics(registry),
            lambda: [(proc.pid, "api_server", ct)],
            engine_metrics=lambda: {"vllm:num_requests_running": 0.0},
            request_restart=lambda r, d: restarts.append((r, d)),
            headroom=lambda: (8 * 1024**3, 4 * 1024**3, "cgroup"),
        )
        time.sleep(0.4)
        for _ in range(12):
            watch.sample()
            time.sleep(0.2)
        trend = next(t for t in watch.trends if t.pid == proc.pid)
        assert trend.rss_bytes_per_s is not None
        assert abs(trend.rss_bytes_per_s - 20e6) / 20e6 < 0.25, trend
        assert trend.time_to_limit_s is not None and trend.time_to_limit_s < 4 * 1024**3 / 10e6
        get = registry.get_sample_value
        assert get("sentinel_process_memory_growth_bytes_per_second", {"role": "api_server"}) > 1e7
        assert trend.leaking and not restarts  # policy report: no restart
        watch.cfg = watch.cfg.model_copy(update={"policy": "restart"})
        watch.sample()
        assert restarts and restarts[0][0] == "leak"  # quiet (nothing running): at once
        assert "api_server pid" in restarts[0][1]
    finally:
        proc.kill()
        proc.wait()


def test_leak_watch_reports_infinite_time_when_flat() -> None:
    registry = CollectorRegistry()
    me = psutil.Process()
    watch = LeakWatch(
        LeakWatchdogConfig(interval_s=1, min_samples=3),
        WatchdogMetrics(registry),
        lambda: [(os.getpid(), "worker", me.create_time())],
        headroom=lambda: (1 << 40, 1 << 39, "host"),
    )
    t = [0.0]
    watch._clock = lambda: t[0]  # noqa: SLF001 - test clock
    for _ in range(4):
        t[0] += 1
        watch.sample()
    ttl = registry.get_sample_value(
        "sentinel_process_memory_time_to_limit_seconds", {"role": "worker"}
    )
    assert ttl is not None and (ttl == math.inf or ttl > 1e5)


def test_stuck_rule_fires_once_per_episode_and_runs_the_policy_after_the_capture() -> None:
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        st = _status_with(spin.pid, "worker")
        st.set_lifecycle(Lifecycle.running)
        st.set_engine_metrics({"vllm:num_requests_running": 0.0})
        order: list[str] = []

        async def capture(reason: str, detail: str) -> None:
            order.append(f"capture:{reason}")

        registry = CollectorRegistry()
        watch = StuckWatch(
            StuckWatchdogConfig(
                cpu_only=True,
                for_s=0.5,
                cpu_busy_ratio=0.02,
                policy="restart",
                capture_on_not_ready=False,
            ),
            st,
            WatchdogMetrics(registry),
            capture,
            request_restart=lambda r, d: order.append(f"restart:{r}"),
        )

        async def main() -> None:
            for _ in range(8):
                await watch.check()
                await asyncio.sleep(0.25)
            await asyncio.sleep(0.1)

        asyncio.run(main())
        assert order == ["capture:cpu_busy_gpu_idle", "restart:stuck"], order
        assert registry.get_sample_value("sentinel_stuck_worker", {"role": "worker"}) == 1
    finally:
        spin.kill()
        spin.wait()


def test_stuck_rule_is_off_without_gpu_or_cpu_only_and_busy_engine_is_not_idle() -> None:
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        for cfg, running, util in (
            (StuckWatchdogConfig(for_s=0.2, capture_on_not_ready=False), 0.0, None),  # CPU: off
            (StuckWatchdogConfig(for_s=0.2, cpu_only=True, capture_on_not_ready=False), 3.0, None),
            (StuckWatchdogConfig(for_s=0.2, capture_on_not_ready=False), 0.0, 0.9),  # GPU busy
        ):
            st = _status_with(spin.pid, "worker")
            st.set_engine_metrics({"vllm:num_requests_running": running})
            fired: list[str] = []

            async def capture(reason: str, detail: str, fired=fired) -> None:
                fired.append(reason)

            watch = StuckWatch(
                cfg,
                st,
                WatchdogMetrics(CollectorRegistry()),
                capture,
                gpu_util=None if util is None else (lambda u=util: {spin.pid: u}),
            )

            async def main(watch=watch) -> None:
                for _ in range(5):
                    await watch.check()
                    await asyncio.sleep(0.15)

            asyncio.run(main())
            assert fired == [], (cfg, running, util)
    finally:
        spin.kill()
        spin.wait()


def test_stall_and_not_ready_capture_once_per_episode() -> None:
    st = EngineStatus()
    st.new_generation()
    st.mark_loaded()
    fired: list[str] = []

    async def capture(reason: str, detail: str) -> None:
        fired.append(reason)

    t = [0.0]
    watch = StuckWatch(
        StuckWatchdogConfig(for_s=5),
        st,
        WatchdogMetrics(CollectorRegistry()),
        capture,
        clock=lambda: t[0],
    )

    async def main() -> None:
        st.set_stalled("no progress for 30s")
        for _ in range(3):
            await watch.check()
        st.set_readiness(False, {"inference": {"ok": False, "detail": "timeout"}})
        for _ in range(4):
            t[0] += 3
            await watch.check()
        await asyncio.sleep(0.05)

    asyncio.run(main())
    assert fired == ["stalled", "not_ready"], fired
    json.dumps(watch.describe(), default=str)


def test_leak_restart_goes_through_the_drain_when_wired(tmp_path: Path) -> None:
    from sentinel.config import SentinelConfig
    from sentinel.watchdogs.service import Watchdogs

    cfg = SentinelConfig.model_validate({"incidents": {"dir": str(tmp_path)}})
    plain: list[str] = []
    drained: list[str] = []
    dogs = Watchdogs(
        cfg, EngineStatus(), CollectorRegistry(), request_restart=lambda r, d: plain.append(r)
    )

    async def graceful() -> None:
        drained.append("restart")

    dogs.restart_leaks_through(graceful)

    async def main() -> None:
        assert dogs.leak.request_restart is not None
        dogs.leak.request_restart("leak", "api_server pid 1: RSS grows")
        await asyncio.sleep(0.05)

    asyncio.run(main())
    assert drained == ["restart"] and plain == []
