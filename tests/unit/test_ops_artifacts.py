"""The shipped alert rules, dashboard and deploy files agree with what Sentinel exports."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "alerts" / "sentinel-rules.yml"
DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))
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
    exprs = []
    for path in DASHBOARDS:
        dash = json.loads(path.read_text())
        exprs += [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
        exprs += [v["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
        exprs += [a["expr"] for a in dash["annotations"]["list"]]
    return exprs


# promtool check/test of the rules: tests/unit/test_alert_rules.py


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
def test_every_sentinel_series_referenced_is_exported(source: str) -> None:
    exprs = _rule_exprs() if source == "alerts" else _dashboard_exprs()
    referenced = {m for e in exprs for m in re.findall(r"\bsentinel_[a-z0-9_]+", e)}
    assert referenced
    known = _sentinel_families()
    missing = sorted(m for m in referenced if _base(m) not in known)
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
            if "alert" not in rule:
                continue
            page = ROOT / "runbooks" / rule["annotations"]["runbook_url"].rsplit("/", 1)[1]
            assert page.is_file(), f"{rule['alert']}: {page} missing"
            assert rule["alert"] in page.read_text(), f"{page} never names {rule['alert']}"


def test_dashboard_json_is_what_the_generator_builds() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("dash_build", ROOT / "dashboards" / "build.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    built = mod.build_all()
    assert sorted(p.stem for p in DASHBOARDS) == sorted(built)
    for uid, doc in built.items():
        path = ROOT / "dashboards" / f"{uid}.json"
        assert json.loads(path.read_text()) == doc, "run python dashboards/build.py"


def test_dashboards_have_template_variables_and_no_datasource_uid() -> None:
    for path in DASHBOARDS:
        dash = json.loads(path.read_text())
        names = {v["name"] for v in dash["templating"]["list"]}
        assert {"datasource", "instance", "gpu"} <= names, path.name
        uids = set(re.findall(r'"uid":\s*"([^"]*)"', path.read_text()))
        assert uids <= {"${datasource}", dash["uid"]}, (path.name, uids)


def test_every_alert_links_an_existing_dashboard() -> None:
    uids = {json.loads(p.read_text())["uid"] for p in DASHBOARDS}
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                uid = rule["annotations"]["dashboard_url"].split("/d/")[1].split("/")[0]
                assert uid in uids, (rule["alert"], uid)


def test_event_driven_panels_exist_and_say_why() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("dash_build", ROOT / "dashboards" / "build.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    titles = {t for doc in mod.build_all().values() for t, _ in mod.queries(doc)}
    assert set(mod.EVENT_DRIVEN) <= titles, set(mod.EVENT_DRIVEN) - titles
    assert all(len(reason) > 10 for reason in mod.EVENT_DRIVEN.values())
