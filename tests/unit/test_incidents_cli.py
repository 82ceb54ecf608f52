"""`sentinel dump` / `sentinel snapshot`: bad input and an unreachable Sentinel give a clear
message and exit status, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "sentinel", *args], capture_output=True, text=True, env=env,
        timeout=60, cwd=ROOT,
    )  # fmt: skip


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    p = tmp_path / "token"
    p.write_text("x" * 32)
    return p


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["dump", "--role", "nope"], "--role must be one of"),
        (["dump", "--role", "worker", "--pid", "3"], "not both"),
        (["dump", "--pid", "0"], "--pid"),
        (["dump", "--bogus"], "No such option"),
        (["snapshot", "--token-file", "/nonexistent/token"], "does not exist"),
    ],
)
def test_bad_input_is_named(args: list[str], message: str) -> None:
    res = _cli(*args)
    assert res.returncode == 2, res
    assert message in res.stderr + res.stdout
    assert "Traceback" not in res.stderr


def test_unreachable_sentinel_is_explained(token_file: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for cmd in ("dump", "snapshot"):
        res = _cli(cmd, "--url", url, "--token-file", str(token_file), "--timeout", "2")
        assert res.returncode == 2, res
        assert "cannot reach Sentinel" in res.stderr and "Traceback" not in res.stderr
