"""Generate Sentinel's Prometheus rules from alerts/source.yml: `python alerts/build.py`.

Writes alerts/sentinel-rules.yml (for Prometheus' rule_files) and
deploy/kubernetes/prometheus-rule.yaml (the same groups in a PrometheusRule), so the rules
have one source. `--check` exits 1 when either file differs from what would be written.

Adds to the hand-written alerts:
- the SLO targets (SLOS, the one place they live), recording rules for each SLI's bad
  ratio over 5m, 30m, 1h, 6h, 3d, and multiwindow multi-burn-rate alerts (Google SRE
  workbook, ch. 5): page at 14.4x over 1h and 5m, page at 6x over 6h and 30m, ticket at 1x
  over 3d and 6h;
- `runbook_url` and `dashboard_url` annotations, absolute, from one base each:
  --runbook-base (env SENTINEL_RUNBOOK_BASE) and --grafana-url (env SENTINEL_GRAFANA_URL).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "alerts" / "source.yml"
RULES = ROOT / "alerts" / "sentinel-rules.yml"
K8S_RULE = ROOT / "deploy" / "kubernetes" / "prometheus-rule.yaml"

# Where runbooks/ is served (a wiki, a docs site, the repository's web view): each alert's
# runbook_url is RUNBOOK_BASE/<runbook>.md. Dashboards: GRAFANA_URL/d/<uid>.
RUNBOOK_BASE = "https://sentinel.example.com/runbooks"
GRAFANA_URL = "http://localhost:3000"

# The SLOs. ttft: share of requests whose first byte (token) leaves the proxy within
# threshold_s (must be a bucket bound of sentinel_proxy_time_to_first_byte_seconds).
# errors: share of requests answered with 5xx or 429 (shed) by any tier or by Sentinel.
SLOS: dict[str, dict[str, Any]] = {
    "ttft": {
        "objective": 0.99,
        "threshold_s": "2.5",
        "title": "time to first token",
        "runbook": "slo-ttft",
        "bad": (
            "1 - (sum by (instance) (rate(sentinel_proxy_time_to_first_byte_seconds_bucket"
            '{{le="{threshold_s}"}}[{w}])) / sum by (instance) '
            "(rate(sentinel_proxy_time_to_first_byte_seconds_count[{w}])))"
        ),
    },
    "errors": {
        "objective": 0.995,
        "title": "error rate",
        "runbook": "slo-errors",
        # `or ... * 0`: an instance that never answered 5xx/429 has no such series; its
        # bad share is 0, not absent (dashboards show it, the end-to-end test caught it)
        "bad": (
            '(sum by (instance) (rate(sentinel_proxy_requests_total{{status=~"5..|429"}}[{w}])) '
            "or 0 * sum by (instance) (rate(sentinel_proxy_requests_total[{w}]))) "
            "/ sum by (instance) (rate(sentinel_proxy_requests_total[{w}]))"
        ),
    },
}
WINDOWS = ("5m", "30m", "1h", "6h", "3d")
# (name suffix, severity, burn factor, long window, short window, for)
BURNS = (
    ("FastBurn", "critical", 14.4, "1h", "5m", "2m"),
    ("SlowBurn", "critical", 6.0, "6h", "30m", "15m"),
    ("BudgetBurn", "warning", 1.0, "3d", "6h", "1h"),
)


def slo_group(name: str, slo: dict[str, Any]) -> dict[str, Any]:
    budget = round(1 - slo["objective"], 6)
    record = f"sentinel:slo_{name}_bad:ratio_rate"
    rules: list[dict[str, Any]] = [
        {
            "record": "sentinel:slo_objective:ratio",
            "expr": f"vector({slo['objective']})",
            "labels": {"slo": name},
        }
    ]
    for w in WINDOWS:
        expr = slo["bad"].format(w=w, threshold_s=slo.get("threshold_s", ""))
        rules.append({"record": record + w, "expr": expr})
    title = "".join(p.capitalize() for p in name.split("_"))
    for suffix, severity, factor, long_w, short_w, for_ in BURNS:
        limit = round(factor * budget, 6)
        rules.append(
            {
                "alert": f"SentinelSlo{title}{suffix}",
                "expr": f"{record}{long_w} > {limit} and {record}{short_w} > {limit}",
                "for": for_,
                "labels": {"severity": severity, "slo": name, "window": long_w},
                "runbook": slo["runbook"],
                "dashboard": "sentinel-overview",
                "annotations": {
                    "summary": (
                        f"{slo['title'].capitalize()} SLO on {{{{ $labels.instance }}}} burns "
                        f"its error budget at {factor}x or more ({long_w} and {short_w})"
                    ),
                    "description": (
                        f"{{{{ $value | humanizePercentage }}}} of requests on "
                        f"{{{{ $labels.instance }}}} were bad over {long_w} (SLO "
                        f"{slo['objective']:.2%}, budget {budget:.2%}): at {factor}x the "
                        f"30-day budget lasts {30 / factor:.1f} days."
                    ),
                },
            }
        )
    return {"name": f"sentinel.slo.{name}", "rules": rules}


def build(runbook_base: str = RUNBOOK_BASE, grafana_url: str = GRAFANA_URL) -> dict[str, Any]:
    src = yaml.safe_load(SOURCE.read_text())
    groups = [slo_group(n, s) for n, s in SLOS.items()] + copy.deepcopy(src["groups"])
    for g in groups:
        out = []
        for r in g["rules"]:
            if "alert" in r:
                runbook = r.pop("runbook")
                dashboard = r.pop("dashboard")
                ann = r.setdefault("annotations", {})
                ann["runbook_url"] = f"{runbook_base.rstrip('/')}/{runbook}.md"
                ann["dashboard_url"] = (
                    f"{grafana_url.rstrip('/')}/d/{dashboard}/{dashboard}"
                    "?var-instance={{ $labels.instance }}"
                )
                order = ["alert", "expr", "for", "labels", "annotations"]
                r = {k: r[k] for k in order if k in r}
            out.append(r)
        g["rules"] = out
    return {"groups": groups}


HEADER = (
    "# GENERATED by alerts/build.py from alerts/source.yml: edit those, not this file.\n"
    "# Check: promtool check rules alerts/sentinel-rules.yml\n"
    "# Test:  promtool test rules alerts/tests/*.yml\n"
)


def _dump(doc: Any) -> str:
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=1000)


def render(runbook_base: str = RUNBOOK_BASE, grafana_url: str = GRAFANA_URL) -> dict[Path, str]:
    rules = build(runbook_base, grafana_url)
    k8s = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "sentinel",
            "labels": {"app.kubernetes.io/name": "sentinel", "release": "prometheus"},
        },
        "spec": rules,
    }
    return {RULES: HEADER + _dump(rules), K8S_RULE: HEADER + _dump(k8s)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runbook-base", default=os.environ.get("SENTINEL_RUNBOOK_BASE", RUNBOOK_BASE))
    ap.add_argument("--grafana-url", default=os.environ.get("SENTINEL_GRAFANA_URL", GRAFANA_URL))
    ap.add_argument("--check", action="store_true", help="exit 1 when a generated file is stale")
    args = ap.parse_args(argv)
    stale = []
    for path, text in render(args.runbook_base, args.grafana_url).items():
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path.relative_to(ROOT)))
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(f"stale (run python alerts/build.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
