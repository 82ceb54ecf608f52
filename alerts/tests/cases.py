# ruff: noqa: E501  (series selectors read best on one line)
"""The promtool unit tests of alerts/sentinel-rules.yml, as a table: for each alert, synthetic
series, a time at which it must NOT fire and one at which it must fire with these labels.

`python alerts/tests/cases.py` writes alerts/tests/sentinel-rules-test.yml. The firing and
silent times and the labels are written here by hand; the expected annotations are the
rendered text promtool reports (captured once with --capture, then read and kept in
annotations.yaml; a changed template fails the test until captured and reviewed again).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
OUT = HERE / "sentinel-rules-test.yml"
OUT_SLO = HERE / "slo-test.yml"  # hours of series: evaluated every 5m, not every 15s
ANN = HERE / "annotations.yaml"

I = 'instance="a"'  # noqa: E741

# (alert, interval, {series: values}, silent_at, firing_at, [expected label sets])
CASES: list[tuple[str, str, dict[str, str], str, str, list[dict[str, str]]]] = [
    (
        "SentinelEngineFailed",
        "15s",
        {f'sentinel_engine_state{{{I}, state="failed"}}': "0 0 1x10"},
        "45s",
        "2m",
        [{"instance": "a", "state": "failed"}],
    ),
    # a hung engine: stalled for 15 s more than probes.stall_window_s
    (
        "SentinelEngineStalled",
        "15s",
        {f"sentinel_engine_stalled{{{I}}}": "0 1x10"},
        "15s",
        "45s",
        [{"instance": "a"}],
    ),
    (
        "SentinelEngineNotReady",
        "15s",
        {
            f"sentinel_engine_ready{{{I}}}": "1 0x10",
            f'sentinel_engine_state{{{I}, state="degraded"}}': "1x10",
        },
        "45s",
        "1m15s",
        [{"instance": "a"}],
    ),
    (
        "SentinelEngineSlowStart",
        "1m",
        {f'sentinel_engine_state{{{I}, state="starting"}}': "1x30"},
        "15m",
        "21m",
        [{"instance": "a", "state": "starting"}],
    ),
    # the first restart fires: the reason's series exists at 0 before it (sentinel_metrics.py)
    (
        "SentinelEngineRestarting",
        "1m",
        {
            f'sentinel_engine_restarts_total{{{I}, reason="crashed"}}': "0 0 0 1 1",
            f'sentinel_engine_restarts_total{{{I}, reason="stalled"}}': "0 0 0 0 0",
        },
        "2m",
        "3m",
        [{"instance": "a", "reason": "crashed"}],
    ),
    (
        "SentinelEngineCrashLooping",
        "1m",
        {
            f'sentinel_engine_restarts_total{{{I}, reason="crashed"}}': "0 0 1 2 3 3",
            f'sentinel_engine_restarts_total{{{I}, reason="not_ready"}}': "0 0 0 0 0 0",
        },
        "3m",
        "4m",
        [{"instance": "a"}],
    ),
    # attach mode: unverified for 5 minutes (identified or not: either way no recovery)
    (
        "SentinelAttachEngineUnverified",
        "1m",
        {f"sentinel_attach_engine_verified{{{I}}}": "1 1 0x10"},
        "5m",
        "8m",
        [{"instance": "a"}],
    ),
    # a refused recovery while the engine is not ready fires; holdoff refusals (done later)
    # never do; silent once the engine is ready again
    (
        "SentinelAttachRecoveryRefused",
        "1m",
        {
            f"sentinel_engine_ready{{{I}}}": "1 1 0 0 0 0 1x20",
            f'sentinel_attach_recoveries_refused_total{{{I}, why="unverified"}}': "0 0 1x20",
            f'sentinel_attach_recoveries_refused_total{{{I}, why="holdoff"}}': "0 0 1 2 3 4 5x20",
            f'sentinel_attach_recoveries_refused_total{{{I}, why="starting"}}': "0 1 2x20",
        },
        "10m",
        "4m",
        [{"instance": "a", "why": "unverified"}],
    ),
    (
        "SentinelEngineUnkillable",
        "15s",
        {f"sentinel_engine_unkillable{{{I}}}": "0 0 1x10"},
        "15s",
        "30s",
        [{"instance": "a"}],
    ),
    (
        "SentinelKvCacheFull",
        "1m",
        {
            f'vllm_kv_cache_usage_perc{{{I}, model_name="m"}}': "0.5 0.97x10",
        },
        "3m",
        "7m",
        [{"instance": "a"}],
    ),
    (
        "SentinelEngineQueueHigh",
        "1m",
        {
            f'vllm_num_requests_waiting{{{I}, model_name="m"}}': "3 40x10",
        },
        "3m",
        "7m",
        [{"instance": "a"}],
    ),
    # lifecycle (branch w16)
    (
        "SentinelDrainTimedOut",
        "1m",
        {
            f'sentinel_drains_total{{{I}, outcome="timeout"}}': "0 0 0 1 1",
            f'sentinel_drains_total{{{I}, outcome="completed"}}': "0 1 2 2 2",
        },
        "2m",
        "3m",
        [{"instance": "a"}],
    ),
    (
        "SentinelDrainStuck",
        "1m",
        {f"sentinel_drain_active{{{I}}}": "0 1x30"},
        "10m",
        "17m",
        [{"instance": "a"}],
    ),
    (
        "SentinelAdminAuthFailures",
        "1m",
        {
            f"sentinel_admin_auth_failures_total{{{I}}}": "0 2 4 6 20",
        },
        "2m",
        "4m",
        [{"instance": "a"}],
    ),
    # watchdogs (branch w17)
    (
        "SentinelEventLoopLag",
        "1m",
        {f"sentinel_event_loop_lag_seconds{{{I}}}": "0.01 0.8x10"},
        "3m",
        "7m",
        [{"instance": "a"}],
    ),
    (
        "SentinelGcPausesOverLimit",
        "1m",
        {
            f'sentinel_gc_pauses_over_limit_total{{{I}, role="api_server"}}': "0 0 0 1 1",
            f'sentinel_gc_pauses_over_limit_total{{{I}, role="sentinel"}}': "0 0 0 0 0",
        },
        "2m",
        "3m",
        [{"instance": "a", "role": "api_server"}],
    ),
    (
        "SentinelMemoryGrowth",
        "1m",
        {
            f'sentinel_process_memory_time_to_limit_seconds{{{I}, role="worker"}}': "90000 1800x20",
            f'sentinel_process_memory_growth_bytes_per_second{{{I}, role="worker"}}': "1e6x21",
        },
        "5m",
        "12m",
        [{"instance": "a", "role": "worker"}],
    ),
    (
        "SentinelDumpTaken",
        "1m",
        {
            f'sentinel_dumps_total{{{I}, reason="stuck_worker", outcome="ok"}}': "0 0 0 1 1",
        },
        "2m",
        "3m",
        [{"instance": "a", "reason": "stuck_worker", "outcome": "ok"}],
    ),
    (
        "SentinelWatchdogAgentDown",
        "1m",
        {
            f'sentinel_watchdog_agent_up{{{I}, role="engine_core"}}': "1 0x10",
        },
        "2m",
        "4m",
        [{"instance": "a", "role": "engine_core"}],
    ),
    (
        "SentinelStuckWorker",
        "15s",
        {f'sentinel_stuck_worker{{{I}, role="worker"}}': "0 1x10"},
        "45s",
        "1m30s",
        [{"instance": "a", "role": "worker"}],
    ),
    # GPU
    (
        "SentinelGpuLost",
        "1m",
        {
            f'sentinel_gpu_lost{{{I}, gpu="0", uuid="GPU-1"}}': "0 0 1 1",
        },
        "1m",
        "2m",
        [{"instance": "a", "gpu": "0", "uuid": "GPU-1"}],
    ),
    (
        "SentinelGpuXid",
        "1m",
        {
            f'sentinel_gpu_xid_errors_total{{{I}, gpu="0", uuid="GPU-1", xid="79"}}': "0 0 1 1 1",
        },
        "1m",
        "3m",
        [{"instance": "a", "gpu": "0", "uuid": "GPU-1", "xid": "79"}],
    ),
    (
        "SentinelGpuEccUncorrected",
        "1m",
        {
            f'sentinel_gpu_ecc_errors_total{{{I}, gpu="0", uuid="GPU-1", type="uncorrected"}}': "0 0 2 2",
            f'sentinel_gpu_ecc_errors_total{{{I}, gpu="0", uuid="GPU-1", type="corrected"}}': "0 5 9 20",
        },
        "1m",
        "3m",
        [{"instance": "a", "gpu": "0", "uuid": "GPU-1", "type": "uncorrected"}],
    ),
    (
        "SentinelGpuRowRemapPending",
        "1m",
        {
            f'sentinel_gpu_remapped_rows_pending{{{I}, gpu="0", uuid="GPU-1"}}': "0 1x10",
        },
        "3m",
        "7m",
        [{"instance": "a", "gpu": "0", "uuid": "GPU-1"}],
    ),
    (
        "SentinelGpuHot",
        "1m",
        {
            f'sentinel_gpu_temperature_celsius{{{I}, gpu="0", uuid="GPU-1"}}': "70 75 80 85x10",
        },
        "6m",
        "9m",
        [{"instance": "a", "gpu": "0", "uuid": "GPU-1"}],
    ),
    (
        "SentinelGpuHardwareThrottle",
        "1m",
        {
            f'sentinel_gpu_clocks_event_reason{{{I}, gpu="0", uuid="GPU-1", reason="HW_SLOWDOWN"}}': "0 1x10",
            f'sentinel_gpu_clocks_event_reason{{{I}, gpu="0", uuid="GPU-1", reason="SW_POWER_CAP"}}': "1x11",
        },
        "3m",
        "7m",
        [{"instance": "a", "gpu": "0", "uuid": "GPU-1"}],
    ),
    (
        "SentinelGpuForeignProcesses",
        "1m",
        {
            f'sentinel_gpu_foreign_processes{{{I}, gpu="0", uuid="GPU-1"}}': "0 1x20",
        },
        "8m",
        "12m",
        [{"instance": "a", "gpu": "0", "uuid": "GPU-1"}],
    ),
    # proxy: the first fallback counts on a series that exists at 0 (proxy/metrics.py)
    (
        "SentinelProxyFallingBack",
        "1m",
        {
            f'sentinel_proxy_requests_total{{{I}, tier="local", status="200"}}': "0+60x2 120x20",
            f'sentinel_proxy_requests_total{{{I}, tier="backup", status="200"}}': "0 0 0+30x20",
            f'sentinel_proxy_fallbacks_total{{{I}, tier="local", reason="not_ready"}}': "0 0 0+30x20",
        },
        "8m",
        "14m",
        [{"instance": "a"}],
    ),
    (
        "SentinelProxyBreakerOpen",
        "1m",
        {
            f'sentinel_proxy_breaker_state{{{I}, upstream="backup"}}': "0 1 2x10",
        },
        "4m",
        "8m",
        [{"instance": "a", "upstream": "backup"}],
    ),
    (
        "SentinelProxyShedding",
        "1m",
        {
            f'sentinel_proxy_rejected_total{{{I}, reason="capacity"}}': "0 0+120x20",
        },
        "4m",
        "8m",
        [{"instance": "a"}],
    ),
    (
        "SentinelPayloadLogDropping",
        "1m",
        {
            f'sentinel_payload_records_dropped_total{{{I}, reason="queue_full"}}': "0 0 0 4 4",
            f'sentinel_payload_records_dropped_total{{{I}, reason="write_error"}}': "0 0 0 0 0",
        },
        "2m",
        "3m",
        [{"instance": "a", "reason": "queue_full"}],
    ),
]


def _slo_series(name: str, good_bad: list[tuple[int, int, int]]) -> dict[str, str]:
    """Series for an SLO: (minutes, good per minute, bad per minute) phases, 1m interval."""
    tot, good, pieces_t, pieces_g = 0, 0, [], []
    for minutes, g, b in good_bad:
        pieces_t.append(f"{tot}+{g + b}x{minutes}")
        pieces_g.append(f"{good}+{g}x{minutes}")
        tot += (g + b) * minutes + (g + b)
        good += g * minutes + g
    if name == "ttft":
        base = f'sentinel_proxy_time_to_first_byte_seconds_{{}}{{{{{I}, tier="local"{{}}}}}}'
        return {
            base.format("count", ""): " ".join(pieces_t),
            base.format("bucket", ', le="2.5"'): " ".join(pieces_g),
        }
    bad = [p.split("x")[0] for p in pieces_t]  # not used
    del bad
    tot, bad_n, pieces_ok, pieces_bad = 0, 0, [], []
    for minutes, g, b in good_bad:
        pieces_ok.append(f"{tot}+{g}x{minutes}")
        pieces_bad.append(f"{bad_n}+{b}x{minutes}")
        tot += g * minutes + g
        bad_n += b * minutes + b
    return {
        f'sentinel_proxy_requests_total{{{I}, tier="local", status="200"}}': " ".join(pieces_ok),
        f'sentinel_proxy_requests_total{{{I}, tier="none", status="503"}}': " ".join(pieces_bad),
    }


def slo_tests() -> list[dict[str, Any]]:
    tests = []
    for slo in ("ttft", "errors"):
        t = "Ttft" if slo == "ttft" else "Errors"
        lab = {"instance": "a", "slo": slo}
        # 1 h healthy, then half the requests bad: fast and slow burn page, the ticket later
        tests.append(
            {
                "interval": "1m",
                "input_series": _slo_series(slo, [(60, 600, 0), (120, 300, 300)]),
                "checks": [
                    ("65m", f"SentinelSlo{t}FastBurn", []),
                    ("65m", f"SentinelSlo{t}SlowBurn", []),
                    ("95m", f"SentinelSlo{t}FastBurn", [{**lab, "window": "1h"}]),
                    ("95m", f"SentinelSlo{t}SlowBurn", [{**lab, "window": "6h"}]),
                    ("95m", f"SentinelSlo{t}BudgetBurn", []),
                    ("140m", f"SentinelSlo{t}BudgetBurn", [{**lab, "window": "3d"}]),
                ],
            }
        )
        # 2% bad for a day: only the ticket; 0.5% bad: nothing
        tests.append(
            {
                "interval": "1m",
                "input_series": _slo_series(slo, [(24 * 60, 980, 20)]),
                "checks": [
                    ("20h", f"SentinelSlo{t}FastBurn", []),
                    ("20h", f"SentinelSlo{t}SlowBurn", []),
                    ("20h", f"SentinelSlo{t}BudgetBurn", [{**lab, "window": "3d"}]),
                ],
            }
        )
        tests.append(
            {
                "interval": "1m",
                "input_series": _slo_series(slo, [(12 * 60, 995, 5)]),
                "checks": [
                    ("10h", f"SentinelSlo{t}BudgetBurn", []),
                    ("10h", f"SentinelSlo{t}SlowBurn", []),
                ],
            }
        )
    # no request ever failed: the error SLI is 0 (not absent), and nothing fires
    tests.append(
        {
            "interval": "1m",
            "input_series": {
                f'sentinel_proxy_requests_total{{{I}, tier="local", status="200"}}': "0+600x120"
            },
            "checks": [("100m", "SentinelSloErrorsFastBurn", [])],
            "promql": [("100m", "sentinel:slo_errors_bad:ratio_rate1h", {"instance": "a"}, 0)],
        }
    )
    return tests


def alert_tests() -> list[dict[str, Any]]:
    tests = []
    for alert, interval, series, silent, firing, labels in CASES:
        tests.append(
            {
                "interval": interval,
                "input_series": series,
                "checks": [(silent, alert, []), (firing, alert, labels)],
            }
        )
    return tests


def _rules(rule_file: str) -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load((HERE / rule_file).read_text())
    return {r["alert"]: r for g in doc["groups"] for r in g["rules"] if "alert" in r}


def render(annotations: dict[str, Any], tests: list[dict[str, Any]], every: str) -> str:
    rules = _rules("../sentinel-rules.yml")
    out_tests = []
    for t in tests:
        checks = []
        for at, alert, label_sets in t["checks"]:
            exp = []
            for labels in label_sets:
                full = {**labels, **rules[alert].get("labels", {})}
                own = {k: v for k, v in labels.items() if k not in rules[alert].get("labels", {})}
                key = f"{alert}@{_secs(at)}s@{json.dumps(own, sort_keys=True)}"
                exp.append({"exp_labels": full, "exp_annotations": annotations.get(key, {})})
            checks.append({"eval_time": at, "alertname": alert, "exp_alerts": exp})
        one: dict[str, Any] = {
            "interval": t["interval"],
            "input_series": [{"series": s, "values": v} for s, v in t["input_series"].items()],
            "alert_rule_test": checks,
        }
        if t.get("promql"):
            one["promql_expr_test"] = [
                {
                    "expr": expr,
                    "eval_time": at,
                    "exp_samples": [{"labels": _sel(expr, lab), "value": v}],
                }
                for at, expr, lab, v in t["promql"]
            ]
        out_tests.append(one)
    doc = {
        "rule_files": ["../sentinel-rules.yml"],
        "evaluation_interval": every,
        "tests": out_tests,
    }
    return (
        "# GENERATED by alerts/tests/cases.py (the cases) and annotations.yaml (the texts).\n"
        "# promtool test rules alerts/tests/*.yml\n"
        + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=1000)
    )


_ANN = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def write(annotations: dict[str, Any]) -> None:
    OUT.write_text(render(annotations, alert_tests(), "15s"))
    OUT_SLO.write_text(render(annotations, slo_tests(), "5m"))


def capture() -> dict[str, Any]:
    """Run promtool with empty expected annotations and keep what it got, per check."""
    write({})
    text = ""
    for f in (OUT, OUT_SLO):
        res = subprocess.run(["promtool", "test", "rules", str(f)], capture_output=True, text=True)
        text += res.stdout + res.stderr
    got: dict[str, Any] = {}
    for block in re.finditer(r"alertname: (\w+), time: (\S+?),.*?got:\[(.*?)\n\s*\]", text, re.S):
        alert, at, body = block.groups()
        for labels_s, ann_s in re.findall(r"Labels:\{(.*?)\}\n\s*Annotations:\{(.*?)\}", body):
            labels = {k: json.loads(f'"{v}"') for k, v in _ANN.findall(labels_s)}
            for k in ("alertname", *_rules("../sentinel-rules.yml")[alert].get("labels", {})):
                labels.pop(k, None)
            ann = {k: json.loads(f'"{v}"') for k, v in _ANN.findall(ann_s)}
            got[f"{alert}@{_secs(at)}s@{json.dumps(labels, sort_keys=True)}"] = ann
    return got


def _sel(name: str, labels: dict[str, str]) -> str:
    return name + "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


def _secs(at: str) -> int:
    m = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", at)
    assert m, at
    h, mi, sec = (int(x or 0) for x in m.groups())
    return h * 3600 + mi * 60 + sec


if __name__ == "__main__":
    if "--capture" in sys.argv:
        ANN.write_text(yaml.safe_dump(capture(), sort_keys=True, allow_unicode=True, width=1000))
    write(yaml.safe_load(ANN.read_text()) if ANN.exists() else {})
