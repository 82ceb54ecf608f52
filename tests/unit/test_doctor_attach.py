"""`sentinel doctor` in attach mode (issue 18): launch-only checks skipped, the engine's
processes and URL reported, an ambiguous match failed with the way out."""

from __future__ import annotations

import subprocess
from pathlib import Path

from sentinel.config.schema import SentinelConfig
from sentinel.doctor.base import Status
from sentinel.doctor.checks import run_checks
from tests.helpers import free_port


def _cfg(**attach: object) -> SentinelConfig:
    base_url = f"http://127.0.0.1:{free_port()}"
    return SentinelConfig.model_validate(
        {"engine": {"mode": "attach", "attach": {"base_url": base_url, **attach}}}
    )


def test_attach_mode_reports_the_found_pids_and_skips_what_it_does_not_launch(
    tmp_path: Path,
) -> None:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        pid_file = tmp_path / "engine.pid"
        pid_file.write_text(str(proc.pid))
        cfg = _cfg(pid_file=str(pid_file))
        results = {r.name: r for r in run_checks(cfg, only={"attach", "model", "vllm", "ports"})}
    finally:
        proc.kill()
        proc.wait()
    assert results["model"].status == Status.skip and results["vllm"].status == Status.skip
    assert results["attach"].status == Status.ok
    assert f"api_server {proc.pid}" in results["attach"].summary
    assert "does not answer" in results["attach"].summary  # nothing listens on that URL
    assert "engine.port" not in results["ports"].summary  # the engine holds it, not Sentinel


def test_attach_mode_fails_on_a_stale_pid_file_and_launch_mode_skips_the_check(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "none.pid"
    [res] = run_checks(_cfg(pid_file=str(missing)), only={"attach"})
    assert res.status == Status.fail and str(missing) in res.summary and res.fix
    [res] = run_checks(SentinelConfig(), only={"attach"})
    assert res.status == Status.skip
