"""`sentinel doctor` against the real tiny model and the real vLLM install: the model
and engine checks pass, with no engine running."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.real.harness import ROOT, base_config

pytestmark = pytest.mark.real


def test_doctor_passes_the_model_checks_on_the_tiny_model(tmp_path: Path) -> None:
    path = tmp_path / "sentinel.yaml"
    path.write_text(yaml.safe_dump(base_config(tmp_path)))
    r = subprocess.run(
        [sys.executable, "-m", "sentinel", "doctor", "--json", "--config", str(path)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    doc = json.loads(r.stdout)
    by = {c["check"]: c for c in doc["checks"]}
    for name in ("vllm", "model", "cgroup_memory", "ports", "disk"):
        assert by[name]["status"] == "pass", by[name]
    assert "LlamaForCausalLM" in by["model"]["summary"]
    assert "vLLM 0." in by["vllm"]["summary"]
    assert r.returncode == (1 if any(c["status"] == "fail" for c in doc["checks"]) else 0)
