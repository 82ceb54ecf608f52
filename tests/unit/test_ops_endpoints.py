"""The ops server end to end (real probes, collectors, http1 server) against a fake engine."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time

import pytest

from sentinel.ops.server import OpsBindError, OpsServer
from sentinel.state import Lifecycle, ProcessInfo
from tests.helpers import free_port, wait_for
from tests.unit.fake_engine import FakeEngine, vllm_metrics
from tests.unit.ops_thread import OpsThread

PROMTOOL = shutil.which("promtool")
FAST = {"interval_s": 0.1, "timeout_s": 0.4, "freshness_s": 2.0, "metrics_interval_s": 0.1}
SECRET_CFG = {
    "served_model_name": "tiny",
    "args": ["--max-model-len", "256", "--api-key", "sk-supersecret-abcdef123"],
    "env": {"HF_TOKEN": "hf_verysecretvalue"},
}


@pytest.fixture(autouse=True)
def _reset(engine):
    engine.mode.update(
        delay=0.0, status=None, metrics=vllm_metrics(running=1, generation=5), metrics_status=200
    )


@pytest.fixture(scope="module")
def ops(engine):
    with OpsThread({"engine": SECRET_CFG, "probes": FAST}, engine.url) as o:
        o.call(o.status.new_generation)
        wait_for(lambda: o.get("/readyz").status_code == 200, 10, what="ready")
        yield o


def test_port_zero_gets_a_real_port_and_a_taken_port_is_a_clear_error(ops):
    assert ops.stack.server.port > 0
    taken = ops.stack.server.port
    with pytest.raises(OpsBindError, match=rf"ops.port {taken} .* already in use"):
        OpsServer(object(), "127.0.0.1", taken).bind()


def test_startupz_503_with_reason_before_load_then_200():
    dead = f"http://127.0.0.1:{free_port()}"
    with OpsThread({"engine": {"served_model_name": "tiny"}, "probes": FAST}, dead) as o:
        r = o.get("/startupz")
        assert r.status_code == 503
        assert r.json()["started"] is False and "engine is stopped" in r.json()["reason"]
        o.call(o.status.new_generation)
        time.sleep(0.3)
        body = o.get("/startupz").json()
        assert body["started"] is False
        assert "loading" in body["reason"] and "connection refused" in body["last_probe"]
        assert o.get("/livez").status_code == 200  # loading never fails liveness
        with FakeEngine(model="tiny") as eng:
            o.control.engine_base_url = eng.url
            wait_for(lambda: o.get("/startupz").status_code == 200, 5, what="startupz 200")
        body = o.get("/startupz").json()
        assert body["started"] is True and body["load_s"] >= 0.3


def test_readyz_names_each_check_and_which_failed(ops, engine):
    body = ops.get("/readyz").json()
    assert body["ready"] is True and body["failed"] == []
    assert set(body["checks"]) == {"lifecycle", "loaded", "inference_probe", "progress"}
    engine.mode["delay"] = 3.0  # hung: completions never come back
    wait_for(lambda: ops.get("/readyz").status_code == 503, 3, what="readyz 503")
    body = ops.get("/readyz").json()
    assert body["failed"] == ["inference_probe"]
    assert "timed out" in body["checks"]["inference_probe"]["detail"]
    assert ops.get("/livez").status_code == 200
    engine.mode["delay"] = 0.0
    wait_for(lambda: ops.get("/readyz").status_code == 200, 5, what="ready again")


def test_a_degraded_engine_stays_ready_and_readyz_and_status_say_why(ops):
    reason = "gpu 0 temperature 85 C >= 82 C"
    ops.call(lambda: ops.status.set_degraded("gpu", reason))
    try:
        r = ops.get("/readyz")
        assert r.status_code == 200  # information for routing and alerts, not unreadiness
        body = r.json()
        assert body["state"] == "degraded" and body["degraded_reasons"] == {"gpu": reason}
        assert ops.get("/status").json()["degraded_reasons"] == {"gpu": reason}
    finally:
        ops.call(lambda: ops.status.clear_degraded("gpu"))
    body = ops.get("/readyz").json()
    assert body["state"] == "ready" and body["degraded_reasons"] == {}


def test_livez_ignores_the_engine_and_fails_when_the_heartbeat_stops(engine):
    with OpsThread(
        {"probes": FAST, "ops": {"livez_heartbeat_timeout_s": 0.5}}, engine.url, run_probes=False
    ) as o:
        for lc in (Lifecycle.restarting, Lifecycle.failed, Lifecycle.draining):
            o.call(lambda lc=lc: o.status.set_lifecycle(lc, "test"))
            assert o.get("/livez").status_code == 200
        body = o.get("/livez").json()
        assert body["alive"] is True and body["heartbeat_age_s"] < 0.5
        heartbeat = next(t for t in o._tasks if t.get_name() == "loop-heartbeat")
        o.loop.call_soon_threadsafe(heartbeat.cancel)
        wait_for(lambda: o.get("/livez").status_code == 503, 3, what="livez 503")
        assert "heartbeat" in o.get("/livez").json()["reason"]


ADMIN = "admin-token-for-the-ops-tests-0123"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


def test_status_has_state_processes_probes_and_no_secrets(ops):
    ops.stack.auth.set_token(ADMIN)
    doc = ops.get("/status", params={"log_tail": 5}, headers=AUTH).json()
    for key in (
        "state",
        "lifecycle",
        "generation",
        "processes",
        "restarts",
        "probes",
        "ready_checks",
        "last_exit",
        "engine_metrics",
        "sentinel",
        "config",
    ):
        assert key in doc
    assert doc["state"] == "ready" and doc["probes"]["inference"]["ok"] is True
    assert doc["engine_metrics"]["vllm:num_requests_running"] == 1
    text = ops.get("/status", params={"log_tail": 5}, headers=AUTH).text
    assert "sk-supersecret" not in text and "hf_verysecretvalue" not in text
    assert "abcdefgh12345" not in text
    assert doc["config"]["engine"]["env_names"] == ["HF_TOKEN"]
    assert "--api-key" in doc["config"]["engine"]["args"]
    assert len(doc["log_tail"]) == 2
    bad = ops.get("/status", params={"log_tail": "lots"})
    assert bad.status_code == 400 and "log_tail" in bad.json()["error"]


def test_metrics_have_sentinel_series_and_the_engines(ops):
    # the engine's series are those of its last scrape (every 0.1 s here): ready can
    # come before it, and the engine is shared with modules that set other values
    running = 'vllm_num_requests_running{engine="0",model_name="tiny"} 1'
    wait_for(lambda: running in ops.get("/metrics").text, 10, what="the engine's series")
    r = ops.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    assert 'sentinel_engine_state{state="ready"} 1.0' in text
    assert 'sentinel_engine_state{state="stalled"} 0.0' in text
    assert "sentinel_engine_up 1.0" in text
    assert 'sentinel_probe_success{probe="inference"} 1.0' in text
    assert 'sentinel_probe_duration_seconds{probe="inference"}' in text
    assert 'sentinel_process_resident_memory_bytes{pid="' in text
    assert 'role="sentinel"' in text
    assert 'vllm_num_requests_running{engine="0",model_name="tiny"} 1' in text
    assert "python_gc_objects" not in text  # only the engine's vllm:* families


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed")
def test_metrics_pass_promtool(ops):
    text = ops.get("/metrics").text
    res = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, text=True, capture_output=True, timeout=30
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_scrape_never_fails_when_the_engine_is_down_or_processes_vanish():
    dead = f"http://127.0.0.1:{free_port()}"
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # never waited: a zombie
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        wait_for(lambda: zombie.pid and _is_zombie(zombie.pid), 10, what="zombie")
        with OpsThread({"probes": FAST}, dead) as o:

            def setup():
                o.status.new_generation()
                o.status.mark_loaded()
                o.status.set_processes(
                    [
                        ProcessInfo(pid=zombie.pid, role="worker", generation=1, create_time=0),
                        ProcessInfo(pid=live.pid, role="engine_core", generation=1, create_time=0),
                        ProcessInfo(
                            pid=_gone_pid(), role="api_server", generation=1, create_time=0
                        ),
                    ]
                )

            o.call(setup)
            time.sleep(0.4)  # a few failed scrapes and probes
            r = o.get("/metrics")
            assert r.status_code == 200
            assert "sentinel_engine_metrics_scrape_success 0.0" in r.text
            assert "vllm_" not in r.text
            assert f'role="engine_core",pid="{live.pid}"' in r.text.replace(
                f'pid="{live.pid}",role="engine_core"', f'role="engine_core",pid="{live.pid}"'
            )
            assert 'role="api_server"' not in r.text
            assert o.get("/readyz").status_code == 503
    finally:
        live.kill()
        live.wait()
        zombie.wait()


def test_passthrough_off_keeps_only_sentinel_series(engine):
    with OpsThread(
        {
            "engine": {"served_model_name": "tiny"},
            "probes": FAST,
            "ops": {"passthrough_engine_metrics": False},
        },
        engine.url,
    ) as o:
        o.call(o.status.new_generation)
        wait_for(lambda: o.status.engine_metrics, 5, what="an engine scrape")
        text = o.get("/metrics").text
        assert "sentinel_engine_up" in text and "vllm" not in text


def test_engine_series_dropped_once_the_generation_is_replaced(ops, engine):
    assert "vllm_num_requests_running" in ops.get("/metrics").text
    engine.mode["status"] = 503  # the new generation does not load: nothing to scrape
    ops.call(lambda: ops.status.set_lifecycle(Lifecycle.restarting))
    ops.call(ops.status.new_generation)  # the engine the series came from is gone
    time.sleep(0.3)  # scrapes of the old generation still in flight land meanwhile
    assert "vllm_num_requests_running" not in ops.get("/metrics").text
    engine.mode["status"] = None
    wait_for(lambda: ops.get("/readyz").status_code == 200, 10, what="ready again")
    wait_for(
        lambda: "vllm_num_requests_running" in ops.get("/metrics").text,
        5,
        what="the new generation's series",
    )


def _is_zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1].startswith("Z")


def _gone_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_bound_port_is_reported_when_binding_ipv4_any():
    srv = OpsServer(object(), "0.0.0.0", 0)
    port = srv.bind()
    try:
        assert port > 0 and srv.url == f"http://127.0.0.1:{port}"
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
    finally:
        srv._sock.close()


def test_sentinel_run_exits_2_naming_the_taken_ops_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cmd = [
            sys.executable,
            "-m",
            "sentinel",
            "run",
            "--set",
            "ops.host=127.0.0.1",
            "--set",
            f"ops.port={port}",
            "--set",
            "proxy.port=0",
            "--set",
            "logging.format=json",
            "--",
            "sleep",
            "100",
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert f"ops.port {port} on ops.host '127.0.0.1' is already in use" in res.stdout + res.stderr
    assert "Traceback" not in res.stdout + res.stderr
