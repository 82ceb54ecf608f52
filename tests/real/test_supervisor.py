"""The supervisor against the real vLLM engine (CPU, tiny model).

One Sentinel serves the whole module (``serving_sentinel``); tests that kill parts
of the engine wait until the replacement serves again. The SIGTERM test runs last
because it stops that Sentinel. Start-up failure tests run their own short-lived
Sentinels with ``on_failed: exit``.
"""

from __future__ import annotations

import os
import signal
import socket
import time

import httpx
import psutil
import pytest

from tests.helpers import wait_for
from tests.real.conftest import SentinelFactory
from tests.real.harness import SentinelProcess, wait_gone

pytestmark = pytest.mark.real

FAIL_FAST = {
    "supervisor": {
        "crash_loop_max_starts": 2,
        "on_failed": "exit",
        "backoff_initial_s": 0.2,
        "backoff_max_s": 0.5,
    }
}


def tree_by_role(s: SentinelProcess) -> dict[str, list[int]]:
    return {role: [p.pid for p in procs] for role, procs in s.engine_processes_by_role().items()}


def full_tree(s: SentinelProcess) -> dict[str, list[int]]:
    """Wait until the generation has its API server, EngineCore and Worker."""
    return wait_for(
        lambda: (
            (t := tree_by_role(s))
            and all(t.get(r) for r in ("api_server", "engine_core", "worker"))
            and t
        ),
        60,
        what="api_server, engine_core and worker processes",
    )


def events(s: SentinelProcess, name: str) -> list[dict]:
    return [r for r in s.log_records() if r.get("event") == name]


def kill_and_expect_replacement(s: SentinelProcess, role: str) -> float:
    s.wait_serving()  # start from a loaded engine, whatever the previous test left
    before = full_tree(s)
    old = [pid for pids in before.values() for pid in pids]
    generations = len(events(s, "engine started"))
    psutil.Process(before[role][0]).kill()
    names = {pid: psutil.Process(pid).name() for pid in old}
    try:
        took = wait_gone(old, timeout=2.0)  # the whole old generation, orphans included
    except AssertionError:
        left = [(pid, names[pid]) for pid in old if psutil.pid_exists(pid)]
        raise AssertionError(f"left after killing {role}: {left}\n{s.log_text()[-3000:]}") from None
    still = {p.pid for p in s.engine_processes_anywhere()} & set(old)
    assert not still, f"old engine processes left after killing {role}: {still}"
    wait_for(lambda: len(events(s, "engine started")) > generations, 30, what="a new generation")
    s.wait_serving()
    after = full_tree(s)
    assert not set(old) & {pid for pids in after.values() for pid in pids}
    return took


def test_serves_completions_with_the_whole_tree_owned(serving_sentinel: SentinelProcess) -> None:
    s = serving_sentinel
    r = s.complete(max_tokens=5, ignore_eos=True)
    assert r.status_code == 200
    assert r.json()["usage"]["completion_tokens"] == 5
    tree = full_tree(s)
    assert len(tree["api_server"]) == 1
    # the engine runs in its own session, led by the API server
    api = tree["api_server"][0]
    for pids in tree.values():
        for pid in pids:
            assert psutil.Process(pid).ppid() != 1
            assert os.getsid(pid) == api
    roles = {r.get("role") for r in events(s, "engine")}
    assert {"api_server", "engine_core"} <= roles, roles
    wait_for(lambda: events(s, "engine loaded"), 10, what="the supervisor to see it loaded")
    assert events(s, "supervisor started")[0]["subreaper"] is True


def test_without_a_gpu_only_gpu_available_0_is_exported(serving_sentinel: SentinelProcess) -> None:
    """On a host without NVML the GPU collector says so once and adds nothing else."""
    s = serving_sentinel
    if any(r.get("event") == "gpu telemetry started" for r in s.log_records()):
        pytest.skip("this host has a GPU")
    gpu_lines = [ln for ln in s.get("/metrics").text.splitlines() if ln.startswith("sentinel_gpu")]
    assert gpu_lines == ["sentinel_gpu_available 0.0"]
    said = [r for r in s.log_records() if str(r.get("event", "")).startswith("gpu telemetry")]
    assert len(said) == 1 and said[0]["event"].startswith("gpu telemetry unavailable")
    wait_for(lambda: s.status()["state"] == "ready", 30, what="state ready")
    assert not s.status()["degraded_reasons"]


def test_sigkill_api_server_kills_orphans_and_restarts(serving_sentinel: SentinelProcess) -> None:
    s = serving_sentinel
    kill_and_expect_replacement(s, "api_server")
    exited = events(s, "engine exited")[-1]
    assert exited["reason"] == "killed" and "SIGKILL" in exited["cause"]
    ended = events(s, "engine generation terminated")[-1]
    assert ended["api_server_was_alive"] is False
    assert len(ended["termed"]) >= 2  # EngineCore and Worker, orphaned


def test_sigkill_engine_core_replaces_the_tree(serving_sentinel: SentinelProcess) -> None:
    s = serving_sentinel
    kill_and_expect_replacement(s, "engine_core")
    reasons = [e["reason"] for e in events(s, "engine exited")]
    assert reasons[-1] in ("engine_core_died", "crashed", "killed"), reasons


def test_sigkill_worker_replaces_the_tree(serving_sentinel: SentinelProcess) -> None:
    s = serving_sentinel
    kill_and_expect_replacement(s, "worker")
    assert events(s, "engine exited")[-1]["reason"] in (
        "worker_died",
        "engine_core_died",
        "crashed",
    )


def test_sigterm_stops_every_engine_process_within_the_grace(
    serving_sentinel: SentinelProcess,
) -> None:
    s = serving_sentinel
    s.wait_serving()
    old = [pid for pids in full_tree(s).values() for pid in pids]
    grace = s.config["supervisor"]["stop_grace_s"]
    t0 = time.monotonic()
    assert s.proc is not None
    s.proc.send_signal(signal.SIGTERM)
    code = s.proc.wait(grace + 10)
    took = time.monotonic() - t0
    wait_gone(old, timeout=0.5)
    assert s.engine_processes_anywhere() == []
    assert took < grace + 5, took
    # documented: Sentinel exits with the API server's status; vLLM exits 0 on SIGTERM
    exiting = events(s, "sentinel exiting")[-1]
    assert code == exiting["exit_code"]
    assert code == 0, exiting


def test_bad_model_path_fails_clearly(sentinel_factory: SentinelFactory, tmp_path) -> None:
    bad = str(tmp_path / "no-such-model")
    s = sentinel_factory({"engine": {"model": bad}, **FAIL_FAST}, name="badmodel")
    assert s.proc is not None
    code = s.proc.wait(300)
    assert code == 1, s.log_text()[-3000:]
    failed = events(s, "engine failed")
    assert len(failed) == 1 and failed[0]["state"] == "failed"
    assert "crash loop: 2 starts" in failed[0]["reason"]
    assert f"model '{bad}' was not found" in failed[0]["reason"]
    exits = events(s, "engine exited")
    assert [e["reason"] for e in exits] == ["model_not_found", "model_not_found"]
    assert any(
        "HFValidationError" in line or "not a valid model" in line for line in exits[-1]["log_tail"]
    )
    assert s.engine_processes_anywhere() == []


def test_port_in_use_names_the_port(sentinel_factory: SentinelFactory) -> None:
    """With on_failed: stay, Sentinel stays up and reports `failed` on /status."""
    stay = {"supervisor": {**FAIL_FAST["supervisor"], "on_failed": "stay"}}
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        s = sentinel_factory({"engine": {"port": port}, **stay}, name="portinuse")

        def failed_status() -> dict | None:
            assert s.proc is not None and s.proc.poll() is None, s.log_text()[-3000:]
            try:
                doc = s.status()
            except (OSError, ValueError, httpx.HTTPError):
                return None
            return doc if doc.get("state") == "failed" else None

        doc = wait_for(failed_status, 60, what="state failed on /status")
    assert f"port {port} on 127.0.0.1 is already in use" in doc["failure_reason"]
    assert doc["last_exit"]["reason"] == "port_in_use"
    assert not events(s, "engine started"), "the engine is never launched onto a taken port"
    assert f"port {port} on 127.0.0.1 is already in use" in events(s, "engine failed")[0]["reason"]
    assert s.stop() == 1  # stopped while failed
    assert s.engine_processes_anywhere() == []


@pytest.mark.skipif(not os.path.exists("/usr/bin/python3"), reason="needs a python without vLLM")
def test_missing_python_package_is_named(sentinel_factory: SentinelFactory) -> None:
    python = "/usr/bin/python3"  # the system interpreter: no vLLM there
    s = sentinel_factory({"engine": {"python": python}, **FAIL_FAST}, name="nomodule")
    assert s.proc is not None
    code = s.proc.wait(60)
    assert code == 1, s.log_text()[-3000:]
    failed = events(s, "engine failed")[0]
    assert f"Python package 'vllm' is not installed for {python}" in failed["reason"]
    assert s.engine_processes_anywhere() == []
