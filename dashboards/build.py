# ruff: noqa: E501  (PromQL expressions read best on one line)
"""Generate dashboards/sentinel.json (Grafana) from this file: `python dashboards/build.py`.

Kept as code so panels stay consistent; the JSON is committed for direct import.
"""

from __future__ import annotations

import json
from pathlib import Path

DS = {"type": "prometheus", "uid": "${datasource}"}
ROWS: list[tuple[str, list[dict]]] = []


def ts(
    title: str, exprs: list[tuple[str, str]], unit: str = "short", w: int = 12, stack: bool = False
) -> dict:
    return {
        "type": "timeseries",
        "title": title,
        "datasource": DS,
        "gridPos": {"w": w, "h": 8},
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "custom": {"stacking": {"mode": "normal" if stack else "none"}},
            },
            "overrides": [],
        },
        "targets": [
            {"refId": chr(65 + i), "expr": e, "legendFormat": legend, "datasource": DS}
            for i, (e, legend) in enumerate(exprs)
        ],
    }


def stat(
    title: str, expr: str, mappings: list[dict] | None = None, unit: str = "short", w: int = 4
) -> dict:
    return {
        "type": "stat",
        "title": title,
        "datasource": DS,
        "gridPos": {"w": w, "h": 4},
        "fieldConfig": {"defaults": {"unit": unit, "mappings": mappings or []}, "overrides": []},
        "targets": [{"refId": "A", "expr": expr, "datasource": DS, "instant": True}],
    }


SEL = 'instance=~"$instance"'
GPU = f'{SEL}, gpu=~"$gpu"'

ROWS.append(
    (
        "Engine",
        [
            stat("State", f"max by (state) (sentinel_engine_state{{{SEL}}}) == 1", w=6),
            stat(
                "Ready",
                f"min(sentinel_engine_ready{{{SEL}}})",
                [
                    {
                        "type": "value",
                        "options": {
                            "0": {"text": "NOT READY", "color": "red"},
                            "1": {"text": "READY", "color": "green"},
                        },
                    }
                ],
            ),
            stat("Generation", f"max(sentinel_engine_generation{{{SEL}}})"),
            stat("Restarts (24h)", f"sum(increase(sentinel_engine_restarts_total{{{SEL}}}[24h]))"),
            stat("Zombies reaped", f"sum(sentinel_zombies_reaped_total{{{SEL}}})", w=3),
            stat("Orphans killed", f"sum(sentinel_orphans_killed_total{{{SEL}}})", w=3),
            ts(
                "Restarts by reason",
                [
                    (
                        f"sum by (reason) (increase(sentinel_engine_restarts_total{{{SEL}}}[$__rate_interval]))",
                        "{{reason}}",
                    )
                ],
            ),
            ts(
                "Probe latency",
                [(f"sentinel_probe_duration_seconds{{{SEL}}}", "{{instance}} {{probe}}")],
                "s",
            ),
            ts(
                "Tokens generated /s",
                [
                    (
                        f"sum by (instance) (rate(vllm_generation_tokens_total{{{SEL}}}[$__rate_interval]))",
                        "{{instance}}",
                    )
                ],
            ),
            ts(
                "Requests running / waiting",
                [
                    (
                        f"sum by (instance) (vllm_num_requests_running{{{SEL}}})",
                        "running {{instance}}",
                    ),
                    (
                        f"sum by (instance) (vllm_num_requests_waiting{{{SEL}}})",
                        "waiting {{instance}}",
                    ),
                ],
            ),
            ts(
                "Process RSS by role",
                [(f"sentinel_process_resident_memory_bytes{{{SEL}}}", "{{instance}} {{role}}")],
                "bytes",
            ),
            ts(
                "Process CPU by role",
                [
                    (
                        f"rate(sentinel_process_cpu_seconds_total{{{SEL}}}[$__rate_interval])",
                        "{{instance}} {{role}}",
                    )
                ],
                "percentunit",
            ),
        ],
    )
)
ROWS.append(
    (
        "GPU",
        [
            ts(
                "Temperature",
                [
                    (f"sentinel_gpu_temperature_celsius{{{GPU}}}", "core gpu{{gpu}}"),
                    (f"sentinel_gpu_memory_temperature_celsius{{{GPU}}}", "memory gpu{{gpu}}"),
                ],
                "celsius",
            ),
            ts(
                "Throttle reasons active",
                [(f"sentinel_gpu_clocks_event_reason{{{GPU}}} == 1", "gpu{{gpu}} {{reason}}")],
                stack=True,
            ),
            ts(
                "Memory bandwidth utilization",
                [
                    (
                        f"sentinel_gpu_memory_bandwidth_utilization_ratio{{{GPU}}}",
                        "gpu{{gpu}} ({{source}})",
                    )
                ],
                "percentunit",
            ),
            ts(
                "SM utilization",
                [(f"sentinel_gpu_sm_utilization_ratio{{{GPU}}}", "gpu{{gpu}}")],
                "percentunit",
            ),
            ts(
                "Clocks",
                [
                    (f"sentinel_gpu_sm_clock_hertz{{{GPU}}}", "sm gpu{{gpu}}"),
                    (f"sentinel_gpu_sm_clock_max_hertz{{{GPU}}}", "sm max gpu{{gpu}}"),
                ],
                "hertz",
            ),
            ts(
                "Power",
                [
                    (f"sentinel_gpu_power_watts{{{GPU}}}", "draw gpu{{gpu}}"),
                    (f"sentinel_gpu_power_limit_watts{{{GPU}}}", "limit gpu{{gpu}}"),
                ],
                "watt",
            ),
            ts(
                "Memory",
                [
                    (f"sentinel_gpu_memory_used_bytes{{{GPU}}}", "used gpu{{gpu}}"),
                    (
                        f"sum by (gpu, role) (sentinel_gpu_engine_memory_bytes{{{GPU}}})",
                        "engine {{role}} gpu{{gpu}}",
                    ),
                    (f"sentinel_gpu_foreign_memory_bytes{{{GPU}}}", "foreign gpu{{gpu}}"),
                ],
                "bytes",
            ),
            ts(
                "Violation time (thermal / power)",
                [
                    (
                        f"rate(sentinel_gpu_thermal_violation_seconds_total{{{GPU}}}[$__rate_interval])",
                        "thermal gpu{{gpu}}",
                    ),
                    (
                        f"rate(sentinel_gpu_power_violation_seconds_total{{{GPU}}}[$__rate_interval])",
                        "power gpu{{gpu}}",
                    ),
                ],
                "percentunit",
            ),
            ts(
                "XID / ECC / PCIe replays",
                [
                    (
                        f"increase(sentinel_gpu_xid_errors_total{{{GPU}}}[$__rate_interval])",
                        "xid {{xid}} gpu{{gpu}}",
                    ),
                    (
                        f"increase(sentinel_gpu_ecc_errors_total{{{GPU}}}[$__rate_interval])",
                        "ecc {{type}} gpu{{gpu}}",
                    ),
                    (
                        f"increase(sentinel_gpu_pcie_replays_total{{{GPU}}}[$__rate_interval])",
                        "pcie replays gpu{{gpu}}",
                    ),
                ],
            ),
        ],
    )
)
ROWS.append(
    (
        "Traffic",
        [
            ts(
                "Requests by tier and status",
                [
                    (
                        f"sum by (tier, status) (rate(sentinel_proxy_requests_total{{{SEL}}}[$__rate_interval]))",
                        "{{tier}} {{status}}",
                    )
                ],
                "reqps",
                stack=True,
            ),
            ts(
                "Fallbacks by reason",
                [
                    (
                        f"sum by (tier, reason) (rate(sentinel_proxy_fallbacks_total{{{SEL}}}[$__rate_interval]))",
                        "{{tier}}: {{reason}}",
                    )
                ],
                "reqps",
            ),
            ts(
                "Time to first byte p50 / p99 by tier",
                [
                    (
                        f"histogram_quantile(0.5, sum by (le, tier) (rate(sentinel_proxy_time_to_first_byte_seconds_bucket{{{SEL}}}[$__rate_interval])))",
                        "p50 {{tier}}",
                    ),
                    (
                        f"histogram_quantile(0.99, sum by (le, tier) (rate(sentinel_proxy_time_to_first_byte_seconds_bucket{{{SEL}}}[$__rate_interval])))",
                        "p99 {{tier}}",
                    ),
                ],
                "s",
            ),
            ts(
                "Latency p50 / p99 by tier",
                [
                    (
                        f"histogram_quantile(0.5, sum by (le, tier) (rate(sentinel_proxy_request_duration_seconds_bucket{{{SEL}}}[$__rate_interval])))",
                        "p50 {{tier}}",
                    ),
                    (
                        f"histogram_quantile(0.99, sum by (le, tier) (rate(sentinel_proxy_request_duration_seconds_bucket{{{SEL}}}[$__rate_interval])))",
                        "p99 {{tier}}",
                    ),
                ],
                "s",
            ),
            ts(
                "Admission queue",
                [
                    (f"sum(sentinel_proxy_queue_depth{{{SEL}}})", "depth"),
                    (
                        f"sum(rate(sentinel_proxy_rejected_total{{{SEL}}}[$__rate_interval]))",
                        "429/s",
                    ),
                ],
            ),
            ts(
                "Breaker state (0 closed, 1 half-open, 2 open)",
                [(f"sentinel_proxy_breaker_state{{{SEL}}}", "{{upstream}}")],
            ),
            ts(
                "Payload log records",
                [
                    (
                        f"sum by (kind) (rate(sentinel_payload_records_total{{{SEL}}}[$__rate_interval]))",
                        "written {{kind}}",
                    ),
                    (
                        f"sum by (reason) (rate(sentinel_payload_records_dropped_total{{{SEL}}}[$__rate_interval]))",
                        "dropped {{reason}}",
                    ),
                ],
            ),
            ts(
                "Client disconnects",
                [
                    (
                        f"sum by (tier) (rate(sentinel_proxy_client_disconnects_total{{{SEL}}}[$__rate_interval]))",
                        "{{tier}}",
                    )
                ],
            ),
        ],
    )
)


def build() -> dict:
    panels: list[dict] = []
    y, pid = 0, 1
    for title, row in ROWS:
        panels.append(
            {
                "type": "row",
                "title": title,
                "id": pid,
                "collapsed": False,
                "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
            }
        )
        pid += 1
        y += 1
        x, row_h = 0, 0
        for p in row:
            w, h = p["gridPos"]["w"], p["gridPos"]["h"]
            if x + w > 24:
                x, y = 0, y + row_h
                row_h = 0
            p["gridPos"].update({"x": x, "y": y})
            p["id"] = pid
            pid += 1
            x += w
            row_h = max(row_h, h)
        y += row_h
        panels.extend(row)

    def var(name: str, query: str, multi: bool = True) -> dict:
        return {
            "name": name,
            "type": "query",
            "datasource": DS,
            "query": query,
            "refresh": 2,
            "multi": multi,
            "includeAll": True,
            "current": {},
        }

    return {
        "title": "Sentinel — vLLM engine, GPU and traffic",
        "uid": "sentinel-overview",
        "schemaVersion": 39,
        "version": 1,
        "tags": ["sentinel", "vllm", "gpu"],
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus", "current": {}},
                var("instance", "label_values(sentinel_engine_state, instance)"),
                var(
                    "gpu",
                    'label_values(sentinel_gpu_temperature_celsius{instance=~"$instance"}, gpu)',
                ),
            ]
        },
        "annotations": {
            "list": [
                {
                    "name": "Engine restarts",
                    "datasource": DS,
                    "enable": True,
                    "iconColor": "red",
                    "expr": f"changes(sentinel_engine_generation{{{SEL}}}[1m]) > 0",
                }
            ]
        },
        "panels": panels,
    }


if __name__ == "__main__":
    out = Path(__file__).with_name("sentinel.json")
    out.write_text(json.dumps(build(), indent=2) + "\n")
    print(f"wrote {out}")
