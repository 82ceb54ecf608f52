# ruff: noqa: E501  (PromQL expressions read best on one line)
"""Generate Sentinel's Grafana dashboards from this file: `python dashboards/build.py`.

Writes one JSON per dashboard (DASHBOARDS: overview with the SLOs, engine and KV cache,
GPU, proxy and degradation chain, watchdogs); the JSON is committed for direct import and
provisioning (deploy/docker). Datasource, instance and GPU are template variables; no
datasource uid is written anywhere.

Built with grafana-foundation-sdk (Grafana's own builders; in the test extra): panels,
rows, variables and the dashboard are its builder objects, serialised with its JSON
encoder. grafanalib (0.7.1) was the other candidate; it is unmaintained since 2024.

EVENT_DRIVEN names the panels whose queries return nothing until their event happens (the
end-to-end test runs every query against a real Prometheus and accepts an empty answer
only for these, with the reason).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import common as common_b
from grafana_foundation_sdk.builders import dashboard as dash_b
from grafana_foundation_sdk.builders import prometheus, timeseries
from grafana_foundation_sdk.builders import stat as stat_b
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as common_m
from grafana_foundation_sdk.models import dashboard as dash_m

DS = dash_m.DataSourceRef(type_val="prometheus", uid="${datasource}")
ROWS: list[tuple[str, list[Any]]] = []
# dashboard uid -> (title, the rows it shows)
DASHBOARDS: dict[str, tuple[str, list[str]]] = {
    "sentinel-overview": ("Sentinel — overview and SLOs", ["SLOs", "At a glance"]),
    "sentinel-engine": ("Sentinel — vLLM engine and KV cache", ["Engine", "KV cache and queue"]),
    "sentinel-gpu": ("Sentinel — GPU health", ["GPU"]),
    "sentinel-proxy": ("Sentinel — proxy and degradation chain", ["Traffic"]),
    "sentinel-watchdogs": ("Sentinel — watchdogs", ["Watchdogs"]),
}
_GPU_REASON = "no GPU series without an NVIDIA GPU (the end-to-end test runs on the CPU)"
EVENT_DRIVEN: dict[str, str] = {
    # GPU
    **{
        t: _GPU_REASON
        for t in (
            "Temperature",
            "Throttle reasons active",
            "Memory bandwidth utilization",
            "SM utilization",
            "Clocks",
            "Power",
            "Memory",
            "Violation time (thermal / power)",
            "XID / ECC / PCIe replays",
            "GPUs lost",
        )
    },
    # watchdogs and lifecycle: series that appear with their first event or sample
    "GC pauses p99 by role": "a histogram with no pause yet in the range has no rate",
    "GC pauses over the limit": "counts pauses over watchdogs.gc.pause_limit_s: an event",
    "Memory growth by role": "exported once the leak window holds watchdogs.leak.min_samples",
    "Time to memory limit": "exported once the leak window holds watchdogs.leak.min_samples",
    "Dumps taken": "a dump is an event",
    "Watchdog agents up": "the agents report once the engine's processes have started",
    "Stuck workers": "the rule needs a GPU (or watchdogs.stuck.cpu_only)",
    "Drain": "a drain is an event",
    **{
        t: "exported only in attach mode (engine.mode: attach); the end-to-end test launches"
        for t in ("Attach mode: engine identified / verified", "Attach mode: recoveries refused")
    },
}


def _query(i: int, expr: str, legend: str | None = None, instant: bool = False) -> Any:
    q = prometheus.Dataquery().ref_id(chr(65 + i)).expr(expr).datasource(DS)
    if legend is not None:
        q = q.legend_format(legend)
    return q.instant() if instant else q


def ts(
    title: str, exprs: list[tuple[str, str]], unit: str = "short", w: int = 12, stack: bool = False
) -> Any:
    mode = common_m.StackingMode.NORMAL if stack else common_m.StackingMode.NONE
    return (
        timeseries.Panel()
        .title(title)
        .datasource(DS)
        .span(w)
        .height(8)
        .unit(unit)
        .stacking(common_b.StackingConfig().mode(mode))
        .targets([_query(i, e, legend) for i, (e, legend) in enumerate(exprs)])
    )


def stat(
    title: str, expr: str, mappings: list[dict] | None = None, unit: str = "short", w: int = 4
) -> Any:
    panel = (
        stat_b.Panel()
        .title(title)
        .datasource(DS)
        .span(w)
        .height(4)
        .unit(unit)
        .targets([_query(0, expr, instant=True)])
    )
    if mappings:
        panel = panel.mappings(
            [
                dash_m.ValueMap(
                    options={
                        k: dash_m.ValueMappingResult(text=v.get("text"), color=v.get("color"))
                        for k, v in m["options"].items()
                    }
                )
                for m in mappings
            ]
        )
    return panel


SEL = 'instance=~"$instance"'
GPU = f'{SEL}, gpu=~"$gpu"'

ROWS.append(
    (
        "SLOs",
        [
            stat(
                "TTFT SLO: good share (1h)",
                f"1 - max(sentinel:slo_ttft_bad:ratio_rate1h{{{SEL}}})",
                unit="percentunit",
                w=6,
            ),
            stat(
                "Error SLO: good share (1h)",
                f"1 - max(sentinel:slo_errors_bad:ratio_rate1h{{{SEL}}})",
                unit="percentunit",
                w=6,
            ),
            stat(
                "TTFT budget burn rate (1h)",
                f'max(sentinel:slo_ttft_bad:ratio_rate1h{{{SEL}}}) / scalar(1 - sentinel:slo_objective:ratio{{slo="ttft"}})',
                w=6,
            ),
            stat(
                "Error budget burn rate (1h)",
                f'max(sentinel:slo_errors_bad:ratio_rate1h{{{SEL}}}) / scalar(1 - sentinel:slo_objective:ratio{{slo="errors"}})',
                w=6,
            ),
            ts(
                "TTFT: bad share by window",
                [
                    (f"sentinel:slo_ttft_bad:ratio_rate{w}{{{SEL}}}", f"{{{{instance}}}} {w}")
                    for w in ("5m", "1h", "6h")
                ],
                "percentunit",
            ),
            ts(
                "Errors: bad share by window",
                [
                    (f"sentinel:slo_errors_bad:ratio_rate{w}{{{SEL}}}", f"{{{{instance}}}} {w}")
                    for w in ("5m", "1h", "6h")
                ],
                "percentunit",
            ),
        ],
    )
)
ROWS.append(
    (
        "At a glance",
        [
            stat("Engine state", f"max by (state) (sentinel_engine_state{{{SEL}}}) == 1", w=6),
            stat("Ready engines", f"sum(sentinel_engine_ready{{{SEL}}})", w=6),
            stat("GPUs lost", f"sum(sentinel_gpu_lost{{{GPU}}})", w=6),
            stat(
                "Share served by fallback tiers (5m)",
                f'sum(rate(sentinel_proxy_requests_total{{{SEL}, tier!="local"}}[5m])) / sum(rate(sentinel_proxy_requests_total{{{SEL}}}[5m]))',
                unit="percentunit",
                w=6,
            ),
        ],
    )
)

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
            # attach mode only (engine.mode: attach): the series are absent in launch mode
            ts(
                "Attach mode: engine identified / verified",
                [
                    (f"sentinel_attach_engine_identified{{{SEL}}}", "identified {{instance}}"),
                    (f"sentinel_attach_engine_verified{{{SEL}}}", "verified {{instance}}"),
                    (f"sentinel_attach_discovery_problem{{{SEL}}}", "problem {{instance}}"),
                ],
            ),
            ts(
                "Attach mode: recoveries refused",
                [
                    (
                        f"sum by (why) (increase(sentinel_attach_recoveries_refused_total{{{SEL}}}[$__rate_interval]))",
                        "{{why}}",
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

ROWS.append(
    (
        "KV cache and queue",
        [
            ts(
                "KV cache usage",
                [(f"max by (instance) (vllm_kv_cache_usage_perc{{{SEL}}})", "{{instance}}")],
                "percentunit",
            ),
            ts(
                "Preemptions /s",
                [
                    (
                        f"sum by (instance) (rate(vllm_num_preemptions_total{{{SEL}}}[$__rate_interval]))",
                        "{{instance}}",
                    )
                ],
            ),
            ts(
                "Prefix cache hit ratio",
                [
                    (
                        f"sum by (instance) (rate(vllm_prefix_cache_hits_total{{{SEL}}}[$__rate_interval])) / sum by (instance) (rate(vllm_prefix_cache_queries_total{{{SEL}}}[$__rate_interval]))",
                        "{{instance}}",
                    )
                ],
                "percentunit",
            ),
            ts(
                "Waiting queue",
                [(f"sum by (instance) (vllm_num_requests_waiting{{{SEL}}})", "{{instance}}")],
            ),
        ],
    )
)
ROWS.append(
    (
        "Watchdogs",
        [
            ts(
                "Event loop lag",
                [(f"sentinel_event_loop_lag_seconds{{{SEL}}}", "{{instance}}")],
                "s",
            ),
            ts(
                "GC pauses p99 by role",
                [
                    (
                        f"histogram_quantile(0.99, sum by (instance, role, le) (rate(sentinel_gc_pause_seconds_bucket{{{SEL}}}[$__rate_interval])))",
                        "{{instance}} {{role}}",
                    )
                ],
                "s",
            ),
            ts(
                "GC pauses over the limit",
                [
                    (
                        f"sum by (instance, role) (increase(sentinel_gc_pauses_over_limit_total{{{SEL}}}[$__rate_interval]))",
                        "{{instance}} {{role}}",
                    )
                ],
            ),
            ts(
                "Memory growth by role",
                [
                    (
                        f"sentinel_process_memory_growth_bytes_per_second{{{SEL}}}",
                        "{{instance}} {{role}}",
                    )
                ],
                "Bps",
            ),
            ts(
                "Time to memory limit",
                [
                    (
                        f"sentinel_process_memory_time_to_limit_seconds{{{SEL}}}",
                        "{{instance}} {{role}}",
                    )
                ],
                "s",
            ),
            ts(
                "Dumps taken",
                [
                    (
                        f"sum by (reason, outcome) (increase(sentinel_dumps_total{{{SEL}}}[$__rate_interval]))",
                        "{{reason}} {{outcome}}",
                    )
                ],
            ),
            stat("Watchdog agents up", f"sum(sentinel_watchdog_agent_up{{{SEL}}})", w=6),
            stat("Stuck workers", f"sum(sentinel_stuck_worker{{{SEL}}})", w=6),
            stat("Drain", f"max(sentinel_drain_active{{{SEL}}})", w=6),
        ],
    )
)


def build_all() -> dict[str, dict]:
    """Every dashboard, by uid."""
    rows = dict(ROWS)
    return {
        uid: build(uid, title, [(r, rows[r]) for r in names])
        for uid, (title, names) in DASHBOARDS.items()
    }


def queries(doc: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every panel target of a dashboard."""
    return [(p["title"], t["expr"]) for p in doc["panels"] for t in p.get("targets", [])]


def concrete(expr: str, rate_interval: str = "1m") -> str:
    """A panel query as Grafana would send it for all instances and GPUs."""
    return (
        expr.replace("$__rate_interval", rate_interval)
        .replace('=~"$instance"', '=~".*"')
        .replace('=~"$gpu"', '=~".*"')
    )


def build(uid: str, title: str, rows: list[tuple[str, list[Any]]]) -> dict:
    def var(name: str, query: str) -> Any:
        return (
            dash_b.QueryVariable(name)
            .datasource(DS)
            .query(query)
            .refresh(dash_m.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .multi(True)
            .include_all(True)
        )

    d = (
        dash_b.Dashboard(title)
        .uid(uid)
        .tags(["sentinel", "vllm", "gpu"])
        .time("now-6h", "now")
        .refresh("30s")
        .with_variable(dash_b.DatasourceVariable("datasource").type("prometheus"))
        .with_variable(var("instance", "label_values(sentinel_engine_state, instance)"))
        .with_variable(
            var("gpu", 'label_values(sentinel_gpu_temperature_celsius{instance=~"$instance"}, gpu)')
        )
        .annotation(
            dash_b.AnnotationQuery()
            .name("Engine restarts")
            .datasource(DS)
            .enable(True)
            .icon_color("red")
            .expr(f"changes(sentinel_engine_generation{{{SEL}}}[1m]) > 0")
        )
        .link(
            dash_b.DashboardLink("Sentinel")
            .type(dash_m.DashboardLinkType.DASHBOARDS)
            .tags(["sentinel"])
            .as_dropdown(True)
        )
    )
    for row_title, panels in rows:
        d = d.with_row(dash_b.Row(row_title))
        for panel in panels:
            d = d.with_panel(panel)
    return json.loads(JSONEncoder(sort_keys=True).encode(d.build()))


def main() -> None:
    here = Path(__file__).parent
    for uid, doc in build_all().items():
        out = here / f"{uid}.json"
        out.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
