"""sentinel_gpu_* exposition from poll snapshots (fake pynvml): every series, labels,
absent-not-zero, and no NVML call during a scrape."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sentinel.collectors.gpu.collector import GpuCollector
from sentinel.collectors.gpu.fake import FakeGpu, FakeNvml
from sentinel.collectors.gpu.nvml import load_nvml
from sentinel.collectors.gpu.poller import GpuPoller
from sentinel.collectors.gpu.sample import CLOCKS_EVENT_REASONS, GpuSnapshot
from sentinel.config.schema import GpuConfig
from sentinel.state import EngineStatus, ProcessInfo

ALL_PER_GPU = {
    "sentinel_gpu_lost",
    "sentinel_gpu_temperature_celsius",
    "sentinel_gpu_memory_temperature_celsius",
    "sentinel_gpu_clocks_event_reason",
    "sentinel_gpu_clocks_event_reasons_mask",
    "sentinel_gpu_memory_bandwidth_utilization_ratio",
    "sentinel_gpu_sm_utilization_ratio",
    "sentinel_gpu_sm_clock_hertz",
    "sentinel_gpu_sm_clock_max_hertz",
    "sentinel_gpu_memory_clock_hertz",
    "sentinel_gpu_memory_clock_max_hertz",
    "sentinel_gpu_power_watts",
    "sentinel_gpu_power_limit_watts",
    "sentinel_gpu_memory_used_bytes",
    "sentinel_gpu_memory_total_bytes",
    "sentinel_gpu_thermal_violation_seconds_total",
    "sentinel_gpu_power_violation_seconds_total",
    "sentinel_gpu_ecc_errors_total",
    "sentinel_gpu_remapped_rows_total",
    "sentinel_gpu_remapped_rows_pending",
    "sentinel_gpu_remapped_rows_failure",
    "sentinel_gpu_pcie_replays_total",
    "sentinel_gpu_xid_errors_total",
    "sentinel_gpu_engine_memory_bytes",
    "sentinel_gpu_foreign_processes",
    "sentinel_gpu_foreign_memory_bytes",
    "sentinel_gpu_poll_duration_seconds",
    "sentinel_gpu_slow_read_duration_seconds",
}


def scrape(registry: CollectorRegistry) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(samples: dict, name: str, **labels: str) -> float | None:
    for lab, v in samples.get(name, []):
        if all(lab.get(k) == x for k, x in labels.items()):
            return v
    return None


def setup(gpus: list[FakeGpu], **kw: object) -> tuple[FakeNvml, GpuPoller, CollectorRegistry]:
    lib = FakeNvml(gpus)
    status = EngineStatus()
    status.set_processes([ProcessInfo(100, "worker", 1, 0.0), ProcessInfo(99, "api_server", 1, 0)])
    poller = GpuPoller(GpuConfig(**kw), status, lambda: [100, 99], load=lambda: load_nvml(lib))
    assert poller.open()
    registry = CollectorRegistry()
    registry.register(GpuCollector(lambda: poller.snapshot))
    return lib, poller, registry


def test_every_series_with_identity_labels() -> None:
    gpu = FakeGpu(
        compute_processes=[(100, 6 << 30), (99, 1 << 30), (777, 2 << 30), (778, 1 << 30)],
        clocks_event_mask=0x84,
        gpm_dram_bw_util=42.0,
    )
    lib, poller, registry = setup([gpu])
    poller.poll_once()
    for _ in range(10):  # slow reads between polls: the power limit, the graphics processes
        poller.refresh_slow()
    lib.inject_xid(0, 79)
    poller.wait_events(0.05)
    poller.poll_once()
    s = scrape(registry)
    assert value(s, "sentinel_gpu_available") == 1.0
    assert value(s, "sentinel_gpu_last_poll_timestamp_seconds") is not None
    per_gpu = {name for name, rows in s.items() if any("gpu" in lab for lab, _ in rows)}
    assert ALL_PER_GPU <= per_gpu, ALL_PER_GPU - per_gpu
    for name in per_gpu:
        for lab, _ in s[name]:
            assert (lab["gpu"], lab["uuid"], lab["name"]) == ("0", gpu.uuid, gpu.name), name
    assert value(s, "sentinel_gpu_memory_bandwidth_utilization_ratio", source="gpm") == 0.42
    assert value(s, "sentinel_gpu_clocks_event_reasons_mask") == 0x84
    active = {lab["reason"] for lab, v in s["sentinel_gpu_clocks_event_reason"] if v == 1.0}
    assert active == {"SW_POWER_CAP", "HW_POWER_BRAKE"}
    assert {lab["reason"] for lab, _ in s["sentinel_gpu_clocks_event_reason"]} == set(
        CLOCKS_EVENT_REASONS
    )
    assert value(s, "sentinel_gpu_xid_errors_total", xid="79") == 1.0
    engine = {
        (lab["role"], lab["pid"]): v for lab, v in s["sentinel_gpu_engine_memory_bytes"]
    }  # per process, with its role
    assert engine == {("worker", "100"): 6 << 30, ("api_server", "99"): 1 << 30}
    assert value(s, "sentinel_gpu_foreign_processes") == 2
    assert value(s, "sentinel_gpu_foreign_memory_bytes") == 3 << 30
    assert value(s, "sentinel_gpu_ecc_errors_total", type="uncorrected") == 0.0
    assert value(s, "sentinel_gpu_remapped_rows_total", cause="correctable") == 0.0
    took = value(s, "sentinel_gpu_slow_read_duration_seconds", read="graphics_processes")
    assert took is not None and 0 <= took < 1


def test_each_engine_process_has_its_own_memory_series() -> None:
    """Tensor parallelism: two workers on one GPU are two series, not one sum."""
    gpu = FakeGpu(compute_processes=[(100, 3 << 30), (101, 5 << 30), (777, 1 << 30)])
    lib = FakeNvml([gpu])
    status = EngineStatus()
    status.set_processes([ProcessInfo(100, "worker", 1, 0.0), ProcessInfo(101, "worker", 1, 0.0)])
    poller = GpuPoller(GpuConfig(), status, load=lambda: load_nvml(lib))
    assert poller.open()
    registry = CollectorRegistry()
    registry.register(GpuCollector(lambda: poller.snapshot))
    poller.poll_once()
    s = scrape(registry)
    engine = {lab["pid"]: (lab["role"], v) for lab, v in s["sentinel_gpu_engine_memory_bytes"]}
    assert engine == {"100": ("worker", 3 << 30), "101": ("worker", 5 << 30)}
    assert value(s, "sentinel_gpu_foreign_processes") == 1


def test_a_scrape_never_calls_nvml() -> None:
    lib, poller, registry = setup([FakeGpu()])
    poller.poll_once()
    before = dict(lib.gpus[0].calls)
    for _ in range(3):
        generate_latest(registry)
    assert lib.gpus[0].calls == before


def test_unsupported_field_is_absent_not_zero_and_counted() -> None:
    gpu = FakeGpu(fail={"nvmlDeviceGetPowerUsage": 3}, field_fail={82: 3})
    _, poller, registry = setup([gpu])
    poller.poll_once()
    poller.poll_once()
    s = scrape(registry)
    assert "sentinel_gpu_power_watts" not in s
    assert "sentinel_gpu_memory_temperature_celsius" not in s
    assert value(s, "sentinel_gpu_power_limit_watts") == 700.0
    assert value(s, "sentinel_gpu_unsupported_field_reads_total", field="power") == 1.0
    assert value(s, "sentinel_gpu_unsupported_field_reads_total", field="memory_temperature") == 1


def test_read_errors_are_counted_by_field_and_error() -> None:
    _, poller, registry = setup([FakeGpu(fail={"nvmlDeviceGetTemperature": 999})])
    poller.poll_once()
    poller.poll_once()
    s = scrape(registry)
    assert value(s, "sentinel_gpu_read_errors_total", field="temperature", error="unknown") == 2


def test_lost_gpu_keeps_identity_and_lost_flag_only() -> None:
    lib, poller, registry = setup([FakeGpu(), FakeGpu(uuid="GPU-1")])
    poller.poll_once()
    lib.gpus[0].lost = True
    poller.poll_once()
    s = scrape(registry)
    assert value(s, "sentinel_gpu_lost", gpu="0") == 1.0
    assert value(s, "sentinel_gpu_lost", gpu="1") == 0.0
    assert value(s, "sentinel_gpu_temperature_celsius", gpu="0") is None
    assert value(s, "sentinel_gpu_temperature_celsius", gpu="1") == 40.0


def test_without_nvml_only_available_zero() -> None:
    registry = CollectorRegistry()
    registry.register(GpuCollector(lambda: GpuSnapshot(available=False, reason="no NVML")))
    lines = [ln for ln in generate_latest(registry).decode().splitlines() if ln[:1] != "#"]
    assert lines == ["sentinel_gpu_available 0.0"]


def test_describe_names_every_family_so_duplicates_are_refused() -> None:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(GpuCollector(lambda: GpuSnapshot(available=False)))
    from prometheus_client import Gauge

    try:
        Gauge("sentinel_gpu_power_watts", "dup", registry=registry)
    except ValueError as exc:
        assert "Duplicated" in str(exc)
    else:
        raise AssertionError("a duplicate GPU series name was accepted")
