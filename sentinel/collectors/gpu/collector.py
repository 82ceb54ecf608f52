"""``sentinel_gpu_*`` series, built at scrape time from the poll thread's last snapshot.

A scrape never calls NVML and never fails because of a GPU: it only reads plain data
(``GpuSnapshot``). A field the device does not support is absent, not zero. Every
per-GPU series carries ``gpu`` (index), ``uuid`` and ``name``. Without NVML only
``sentinel_gpu_available 0`` is exposed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sentinel.collectors.gpu.sample import CLOCKS_EVENT_REASONS, GpuSample, GpuSnapshot

_ID = ["gpu", "uuid", "name"]


def _g(name: str, doc: str, *extra: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=[*_ID, *extra])


def _c(name: str, doc: str, *extra: str) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=[*_ID, *extra])


def build_families(snapshot: GpuSnapshot) -> list[Metric]:
    """Every GPU family, with samples from ``snapshot`` (empty families included)."""
    available = GaugeMetricFamily(
        "sentinel_gpu_available", "1 when NVML is loaded and sees at least one GPU, else 0."
    )
    available.add_metric([], 1.0 if snapshot.available else 0.0)
    last_poll = GaugeMetricFamily(
        "sentinel_gpu_last_poll_timestamp_seconds", "Unix time of the last GPU poll."
    )
    if snapshot.at is not None:
        last_poll.add_metric([], snapshot.at)

    lost = _g("sentinel_gpu_lost", "1 when the GPU fell off the bus or needs a reset.")
    temp = _g("sentinel_gpu_temperature_celsius", "GPU core temperature.")
    mtemp = _g("sentinel_gpu_memory_temperature_celsius", "GPU memory (HBM) temperature.")
    reason = _g(
        "sentinel_gpu_clocks_event_reason",
        "1 while this clocks-event (throttle) reason is active.",
        "reason",
    )
    mask = _g("sentinel_gpu_clocks_event_reasons_mask", "Raw clocks-event reasons bit mask.")
    bw = _g(
        "sentinel_gpu_memory_bandwidth_utilization_ratio",
        "DRAM bandwidth used vs. peak (source=gpm), else the fraction of time memory "
        "was read or written (source=nvml).",
        "source",
    )
    sm = _g(
        "sentinel_gpu_sm_utilization_ratio",
        "Fraction of SMs busy (source=gpm), else of time a kernel ran (source=nvml).",
        "source",
    )
    sm_clock = _g("sentinel_gpu_sm_clock_hertz", "Current SM clock.")
    sm_max = _g("sentinel_gpu_sm_clock_max_hertz", "Maximum SM clock.")
    mem_clock = _g("sentinel_gpu_memory_clock_hertz", "Current memory clock.")
    mem_max = _g("sentinel_gpu_memory_clock_max_hertz", "Maximum memory clock.")
    power = _g("sentinel_gpu_power_watts", "Power draw.")
    power_limit = _g("sentinel_gpu_power_limit_watts", "Enforced power limit.")
    mem_used = _g("sentinel_gpu_memory_used_bytes", "GPU memory in use.")
    mem_total = _g("sentinel_gpu_memory_total_bytes", "GPU memory in total.")
    thermal_v = _c(
        "sentinel_gpu_thermal_violation_seconds", "Time clocks were held down by thermal limits."
    )
    power_v = _c(
        "sentinel_gpu_power_violation_seconds", "Time clocks were held down by the power limit."
    )
    ecc = _c(
        "sentinel_gpu_ecc_errors",
        "Volatile ECC errors since the driver loaded, by type (corrected, uncorrected).",
        "type",
    )
    remapped = _c(
        "sentinel_gpu_remapped_rows",
        "Memory rows remapped, by cause (correctable, uncorrectable).",
        "cause",
    )
    pending = _g("sentinel_gpu_remapped_rows_pending", "1 when a row remap awaits a GPU reset.")
    failure = _g("sentinel_gpu_remapped_rows_failure", "1 when a row remap has failed.")
    replay = _c("sentinel_gpu_pcie_replays", "PCIe replay counter.")
    xid = _c("sentinel_gpu_xid_errors", "XID errors seen by Sentinel, by XID code.", "xid")
    eng_mem = _g(
        "sentinel_gpu_engine_memory_bytes",
        "GPU memory held by each of the engine's processes (role, pid); sum by role for "
        "the engine's total.",
        "role",
        "pid",
    )
    foreign_n = _g(
        "sentinel_gpu_foreign_processes", "GPU processes Sentinel did not start (count)."
    )
    foreign_mem = _g(
        "sentinel_gpu_foreign_memory_bytes", "GPU memory held by processes Sentinel did not start."
    )
    unsupported = _c(
        "sentinel_gpu_unsupported_field_reads",
        "Reads answered NotSupported (or no permission); the field is then left out.",
        "field",
    )
    errors = _c(
        "sentinel_gpu_read_errors", "Failed NVML reads other than unsupported.", "field", "error"
    )
    duration = _g("sentinel_gpu_poll_duration_seconds", "Time the last poll of this GPU took.")
    slow_duration = _g(
        "sentinel_gpu_slow_read_duration_seconds",
        "Time the last read of a slow counter (or the graphics-process list) took; slow "
        "reads happen between polls, every gpu.slow_counters_interval_s.",
        "read",
    )

    def put(fam: GaugeMetricFamily | CounterMetricFamily, ids: list[str], value: object) -> None:
        if value is not None:
            fam.add_metric(ids, float(value))  # type: ignore[arg-type]

    for d in snapshot.devices:
        ids = [str(d.index), d.uuid, d.name]
        lost.add_metric(ids, 1.0 if d.lost else 0.0)
        duration.add_metric(ids, d.poll_duration_s)
        for read, seconds in sorted(d.slow_read_durations_s.items()):
            slow_duration.add_metric([*ids, read], seconds)
        for code, n in sorted(d.xid_counts.items()):
            xid.add_metric([*ids, str(code)], n)
        for field, n in sorted(d.unsupported_reads.items()):
            unsupported.add_metric([*ids, field], n)
        for (field, err), n in sorted(d.read_errors.items()):
            errors.add_metric([*ids, field, err], n)
        if d.lost:
            continue
        put(temp, ids, d.temperature_c)
        put(mtemp, ids, d.memory_temperature_c)
        if d.clocks_event_mask is not None:
            mask.add_metric(ids, d.clocks_event_mask)
            for name, bit in CLOCKS_EVENT_REASONS.items():
                reason.add_metric([*ids, name], 1.0 if d.clocks_event_mask & bit else 0.0)
        if d.memory_bandwidth_ratio is not None:
            bw.add_metric([*ids, d.memory_bandwidth_source or ""], d.memory_bandwidth_ratio)
        if d.sm_utilization_ratio is not None:
            sm.add_metric([*ids, d.sm_utilization_source or ""], d.sm_utilization_ratio)
        put(sm_clock, ids, d.sm_clock_hz)
        put(sm_max, ids, d.sm_clock_max_hz)
        put(mem_clock, ids, d.memory_clock_hz)
        put(mem_max, ids, d.memory_clock_max_hz)
        put(power, ids, d.power_w)
        put(power_limit, ids, d.power_limit_w)
        put(mem_used, ids, d.memory_used_bytes)
        put(mem_total, ids, d.memory_total_bytes)
        put(thermal_v, ids, d.thermal_violation_s)
        put(power_v, ids, d.power_violation_s)
        put(ecc, [*ids, "corrected"], d.ecc_corrected)
        put(ecc, [*ids, "uncorrected"], d.ecc_uncorrected)
        put(remapped, [*ids, "correctable"], d.remapped_correctable)
        put(remapped, [*ids, "uncorrectable"], d.remapped_uncorrectable)
        put(pending, ids, d.remapped_pending)
        put(failure, ids, d.remapped_failure)
        put(replay, ids, d.pcie_replays)
        _processes(d, ids, eng_mem, foreign_n, foreign_mem)

    return [
        available,
        last_poll,
        lost,
        temp,
        mtemp,
        reason,
        mask,
        bw,
        sm,
        sm_clock,
        sm_max,
        mem_clock,
        mem_max,
        power,
        power_limit,
        mem_used,
        mem_total,
        thermal_v,
        power_v,
        ecc,
        remapped,
        pending,
        failure,
        replay,
        xid,
        eng_mem,
        foreign_n,
        foreign_mem,
        unsupported,
        errors,
        duration,
        slow_duration,
    ]


def _processes(
    d: GpuSample,
    ids: list[str],
    eng_mem: GaugeMetricFamily,
    foreign_n: GaugeMetricFamily,
    foreign_mem: GaugeMetricFamily,
) -> None:
    if d.processes is None:  # the driver would not list processes
        return
    n_foreign = foreign_bytes = 0
    for p in d.processes:  # one per pid (nvml.py merges the compute and graphics lists)
        if p.role is None:
            n_foreign += 1
            foreign_bytes += p.used_bytes
        else:
            eng_mem.add_metric([*ids, p.role, str(p.pid)], p.used_bytes)
    foreign_n.add_metric(ids, n_foreign)
    foreign_mem.add_metric(ids, foreign_bytes)


class GpuCollector(Collector):
    """Register into the app's ``CollectorRegistry``; reads ``snapshot()`` per scrape."""

    def __init__(self, snapshot: Callable[[], GpuSnapshot]) -> None:
        self._snapshot = snapshot

    def describe(self) -> Iterator[Metric]:
        return iter(build_families(GpuSnapshot(available=False)))

    def collect(self) -> Iterator[Metric]:
        for family in build_families(self._snapshot()):
            if family.samples:
                yield family
