"""The shipped alert rules, dashboard and deploy files agree with what Sentinel exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "alerts" / "sentinel-rules.yml"
DASHBOARD = ROOT / "dashboards" / "sentinel.json"
PROMTOOL = shutil.which("promtool")
SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created")


def _sentinel_families() -> set[str]:
    """Every metric family name defined in Sentinel's source (string literals)."""
    names: set[str] = set()
    for path in (ROOT / "sentinel").rglob("*.py"):
        names.update(re.findall(r"[\"'](sentinel_[a-z0-9_]+)[\"']", path.read_text()))
    return names


def _base(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _rule_exprs() -> list[str]:
    doc = yaml.safe_load(RULES.read_text())
    return [r["expr"] for g in doc["groups"] for r in g["rules"]]


def _dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    exprs += [a["expr"] for a in dash["annotations"]["list"]]
    return exprs


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (deploy/cpu/install.sh)")
def test_alert_rules_pass_promtool_check_and_unit_tests() -> None:
    check = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    tests = sorted((ROOT / "alerts" / "tests").glob("*.yml"))
    assert tests
    run = subprocess.run(
        [PROMTOOL, "test", "rules", *map(str, tests)],
        capture_output=True,
        text=True,
        cwd=ROOT / "alerts" / "tests",
    )
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
def test_every_sentinel_series_referenced_is_exported(source: str) -> None:
    exprs = _rule_exprs() if source == "alerts" else _dashboard_exprs()
    referenced = {m for e in exprs for m in re.findall(r"\bsentinel_[a-z0-9_]+", e)}
    assert referenced
    missing = sorted(m for m in referenced if _base(m) not in _sentinel_families())
    assert not missing, f"{source} reference series Sentinel does not export: {missing}"


def test_every_vllm_series_in_the_dashboard_exists_in_real_vllm_output() -> None:
    # Sentinel passes vLLM's `vllm:x` series through as `vllm_x` (promtool-clean names)
    sample = (ROOT / "tests" / "unit" / "data_vllm_metrics.txt").read_text()
    real = {m.replace(":", "_") for m in re.findall(r"^(vllm:[a-z_:]+)", sample, re.M)}
    used = {m for e in _dashboard_exprs() for m in re.findall(r"vllm[:_][a-z_:]+", e)}
    assert used and used <= real, sorted(used - real)


def test_every_alert_has_a_runbook_that_exists() -> None:
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            url = rule["annotations"]["runbook_url"]
            assert (ROOT / url).is_file(), f"{rule['alert']}: {url} missing"
            assert rule["alert"] in (ROOT / url).read_text(), f"{url} never names {rule['alert']}"


def test_dashboard_json_is_what_the_generator_builds() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("dash_build", ROOT / "dashboards" / "build.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert json.loads(DASHBOARD.read_text()) == mod.build(), "run python dashboards/build.py"
