"""alerts/: the generated rule files are current, pass promtool, and every alert is
unit-tested firing and silent, links an existing runbook and a dashboard by absolute URL."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "alerts"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool missing (make setup)")


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem + "_mod", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


build = _load(ALERTS / "build.py")
cases = _load(ALERTS / "tests" / "cases.py")


def _alerts(doc: dict) -> dict[str, dict]:
    return {r["alert"]: r for g in doc["groups"] for r in g["rules"] if "alert" in r}


RULES = yaml.safe_load((ALERTS / "sentinel-rules.yml").read_text())


def test_generated_rule_files_are_current() -> None:
    for path, text in build.render().items():
        assert path.read_text() == text, f"{path} is stale: run python alerts/build.py"


def test_generated_promtool_tests_are_current() -> None:
    ann = yaml.safe_load((ALERTS / "tests" / "annotations.yaml").read_text())
    assert (ALERTS / "tests" / "sentinel-rules-test.yml").read_text() == cases.render(
        ann, cases.alert_tests(), "15s"
    )
    assert (ALERTS / "tests" / "slo-test.yml").read_text() == cases.render(
        ann, cases.slo_tests(), "5m"
    )


def test_the_prometheusrule_carries_the_same_groups() -> None:
    k8s = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "prometheus-rule.yaml").read_text())
    assert k8s["kind"] == "PrometheusRule"
    assert k8s["spec"] == RULES


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    res = subprocess.run(
        [PROMTOOL, "check", "rules", str(ALERTS / "sentinel-rules.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr


@needs_promtool
@pytest.mark.parametrize("name", ["sentinel-rules-test.yml", "slo-test.yml"])
def test_promtool_unit_tests_pass(name: str) -> None:
    res = subprocess.run(
        [PROMTOOL, "test", "rules", str(ALERTS / "tests" / name)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]


def test_every_alert_is_tested_silent_and_firing() -> None:
    silent: set[str] = set()
    firing: set[str] = set()
    for t in cases.alert_tests() + cases.slo_tests():
        for _, alert, exp in t["checks"]:
            (firing if exp else silent).add(alert)
    alerts = set(_alerts(RULES))
    assert alerts - firing == set(), "alerts never shown firing"
    assert alerts - silent == set(), "alerts never shown silent"


def test_every_alert_has_severity_texts_and_absolute_links() -> None:
    for name, rule in _alerts(RULES).items():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        ann = rule["annotations"]
        assert ann["summary"] and ann["description"], name
        assert ann["runbook_url"].startswith(build.RUNBOOK_BASE + "/"), name
        runbook = ann["runbook_url"].rsplit("/", 1)[1]
        assert (ROOT / "runbooks" / runbook).is_file(), f"{name}: runbooks/{runbook} missing"
        assert ann["dashboard_url"].startswith(build.GRAFANA_URL + "/d/sentinel-"), name


def test_the_link_bases_are_configurable_in_one_place() -> None:
    doc = build.build(runbook_base="https://wiki.corp/sre/", grafana_url="https://g.corp")
    for name, rule in _alerts(doc).items():
        assert rule["annotations"]["runbook_url"].startswith("https://wiki.corp/sre/"), name
        assert "//" not in rule["annotations"]["runbook_url"].removeprefix("https://"), name
        assert rule["annotations"]["dashboard_url"].startswith("https://g.corp/d/"), name


def test_slo_targets_live_in_one_place() -> None:
    text = (ALERTS / "sentinel-rules.yml").read_text()
    for name, slo in build.SLOS.items():
        budget = round(1 - slo["objective"], 6)
        assert f"vector({slo['objective']})" in text
        for _, _, factor, long_w, short_w, _ in build.BURNS:
            limit = round(factor * budget, 6)
            expr = (
                f"sentinel:slo_{name}_bad:ratio_rate{long_w} > {limit} and "
                f"sentinel:slo_{name}_bad:ratio_rate{short_w} > {limit}"
            )
            assert expr in text
