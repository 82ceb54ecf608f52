"""`sentinel doctor` in attach mode (issue 18): launch-only checks skipped, the engine's
processes and URL reported, an ambiguous match failed with the way out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil

from sentinel.config.schema import SentinelConfig
from sentinel.doctor.base import Status
from sentinel.doctor.checks import run_checks
from tests.helpers import free_port, wait_for


def _cfg(**attach: object) -> SentinelConfig:
    attach.setdefault("base_url", f"http://127.0.0.1:{free_port()}")
    return SentinelConfig.model_validate({"engine": {"mode": "attach", "attach": attach}})


def _doctor_elsewhere(cfg: SentinelConfig, only: set[str]) -> dict[str, dict[str, str]]:
    """run_checks in another process: the engine must not be the doctor's own child (a
    process Sentinel started is never taken for the engine)."""
    code = (
        "import json, sys; from sentinel.config.schema import SentinelConfig; "
        "from sentinel.doctor.checks import run_checks; "
        "cfg = SentinelConfig.model_validate_json(sys.stdin.read()); "
        "print(json.dumps({r.name: {'status': r.status.value, 'summary': r.summary, "
        f"'fix': r.fix}} "
        f"for r in run_checks(cfg, only={sorted(only)!r})}}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], input=cfg.model_dump_json(), capture_output=True,
        text=True, timeout=60, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_attach_mode_reports_the_found_pids_and_skips_what_it_does_not_launch(
    tmp_path: Path,
) -> None:
    port = free_port()
    listener = (
        "import socket, time; s = socket.socket(); "
        f"s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(60)"
    )
    engine = subprocess.Popen([sys.executable, "-c", listener])
    deaf = subprocess.Popen(["sleep", "60"])
    try:
        pid_file = tmp_path / "engine.pid"
        pid_file.write_text(str(engine.pid))
        cfg = _cfg(pid_file=str(pid_file), base_url=f"http://127.0.0.1:{port}")
        wait_for(lambda: port in {c.laddr.port for c in psutil.Process(engine.pid)
                                  .net_connections("tcp")}, 10, what="listening")  # fmt: skip
        results = _doctor_elsewhere(cfg, {"attach", "model", "vllm", "ports"})
        # a pid file naming a process that does not serve the URL's port: never recovered
        pid_file.write_text(str(deaf.pid))
        [not_serving] = _doctor_elsewhere(cfg, {"attach"}).values()
    finally:
        for proc in (engine, deaf):
            proc.kill()
            proc.wait()
    assert results["model"]["status"] == "skip" and results["vllm"]["status"] == "skip"
    assert results["attach"]["status"] == "pass", results
    assert f"api_server {engine.pid}" in results["attach"]["summary"]
    assert "does not answer" in results["attach"]["summary"]  # it listens, speaks no HTTP
    assert "engine.port" not in results["ports"]["summary"]  # the engine holds it, not Sentinel
    assert not_serving["status"] == "fail", not_serving
    assert f"{deaf.pid}" in not_serving["summary"] and "no recovery" in not_serving["summary"]
    assert "--port" in not_serving["fix"] and "SYS_PTRACE" in not_serving["fix"]


def test_attach_mode_fails_on_a_stale_pid_file_and_launch_mode_skips_the_check(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "none.pid"
    [res] = run_checks(_cfg(pid_file=str(missing)), only={"attach"})
    assert res.status == Status.fail and str(missing) in res.summary and res.fix
    [res] = run_checks(SentinelConfig(), only={"attach"})
    assert res.status == Status.skip
