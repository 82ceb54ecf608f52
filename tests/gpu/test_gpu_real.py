"""GPU telemetry against a real NVIDIA GPU (run on the H100 through the device tool).

Skipped where NVML cannot be loaded. Values read are printed (run with ``-s``) and,
when ``SENTINEL_GPU_OUT`` names a folder, the /metrics exposition is written there.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sentinel.collectors.gpu import GpuCollector, GpuPoller, gpu_processes
from sentinel.collectors.gpu.fields import FieldValues
from sentinel.collectors.gpu.nvml import load_nvml
from sentinel.collectors.gpu.sample import GpuSnapshot
from sentinel.config.schema import GpuConfig
from sentinel.state import EngineStatus, ProcessInfo

COPY_LOOP = Path(__file__).with_name("copy_loop.py")
OUT = os.environ.get("SENTINEL_GPU_OUT")

# series -> the field whose "unsupported" count alone excuses its absence
SERIES = {
    "sentinel_gpu_temperature_celsius": "temperature",
    "sentinel_gpu_memory_temperature_celsius": "memory_temperature",
    "sentinel_gpu_clocks_event_reason": "clocks_event_reasons",
    "sentinel_gpu_clocks_event_reasons_mask": "clocks_event_reasons",
    "sentinel_gpu_memory_bandwidth_utilization_ratio": "utilization",
    "sentinel_gpu_sm_utilization_ratio": "utilization",
    "sentinel_gpu_sm_clock_hertz": "sm_clock",
    "sentinel_gpu_sm_clock_max_hertz": "sm_clock_max",
    "sentinel_gpu_memory_clock_hertz": "memory_clock",
    "sentinel_gpu_memory_clock_max_hertz": "memory_clock_max",
    "sentinel_gpu_power_watts": "power",
    "sentinel_gpu_power_limit_watts": "power_limit",
    "sentinel_gpu_memory_used_bytes": "memory",
    "sentinel_gpu_memory_total_bytes": "memory",
    "sentinel_gpu_thermal_violation_seconds_total": "thermal_violation",
    "sentinel_gpu_power_violation_seconds_total": "power_violation",
    "sentinel_gpu_ecc_errors_total": "ecc_corrected",
    "sentinel_gpu_remapped_rows_total": "remapped_correctable",
    "sentinel_gpu_remapped_rows_pending": "remapped_pending",
    "sentinel_gpu_remapped_rows_failure": "remapped_failure",
    "sentinel_gpu_pcie_replays_total": "pcie_replay",
    "sentinel_gpu_foreign_processes": "compute_processes",
    "sentinel_gpu_foreign_memory_bytes": "compute_processes",
    "sentinel_gpu_lost": "",
    "sentinel_gpu_poll_duration_seconds": "",
    "sentinel_gpu_slow_read_duration_seconds": "graphics_processes",
}


def _values(registry: CollectorRegistry) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    text = generate_latest(registry).decode()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def _one(values: dict, name: str, gpu: int = 0, **labels: str) -> float | None:
    for lab, v in values.get(name, []):
        if lab.get("gpu") == str(gpu) and all(lab.get(k) == x for k, x in labels.items()):
            return v
    return None


@pytest.fixture
def poller() -> Iterator[GpuPoller]:
    p = GpuPoller(GpuConfig(poll_interval_s=0.5), EngineStatus())
    assert p.open(), p.snapshot.reason
    yield p
    p.close()


@pytest.fixture
def registry(poller: GpuPoller) -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(GpuCollector(lambda: poller.snapshot))
    return reg


def _copy_loop(seconds: float, gib: float = 2.0) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, str(COPY_LOOP), str(seconds), str(gib)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "ready", f"copy loop did not start: {line!r}"
    return proc


def test_every_series_present_with_plausible_values(
    poller: GpuPoller, registry: CollectorRegistry
) -> None:
    poller.poll_once()
    time.sleep(0.25)
    poller.refresh_slow()  # the first slow read, between polls as in the poll thread
    time.sleep(0.25)
    snap = poller.poll_once()
    values = _values(registry)
    text = generate_latest(registry).decode()
    if OUT:
        Path(OUT, "metrics_idle.txt").write_text(text)
    assert _one(values, "sentinel_gpu_available", gpu=0) is None  # no labels on it
    assert values["sentinel_gpu_available"][0][1] == 1.0
    for dev in snap.devices:
        assert not dev.lost
        print(f"\nGPU {dev.index} {dev.name} {dev.uuid}")
        print(f"  unsupported: {dev.unsupported_reads}  read errors: {dev.read_errors}")
        for name, field in SERIES.items():
            got = [lab for lab, _ in values.get(name, []) if lab["gpu"] == str(dev.index)]
            for lab in got:
                assert lab["uuid"] == dev.uuid and lab["name"] == dev.name
            if not got:
                assert field and dev.unsupported_reads.get(field), f"{name} missing, not counted"
                print(f"  {name}: absent (unsupported: {field})")
        g = dev.index

        def check(name: str, lo: float, hi: float, g: int = g, **lab: str) -> None:
            v = _one(values, name, g, **lab)
            print(f"  {name}{lab or ''} = {v}")
            if v is not None:
                assert lo <= v <= hi, f"{name}={v} outside [{lo}, {hi}]"

        check("sentinel_gpu_temperature_celsius", 5, 100)
        check("sentinel_gpu_memory_temperature_celsius", 5, 110)
        check("sentinel_gpu_clocks_event_reasons_mask", 0, 0x1FF)
        check("sentinel_gpu_sm_clock_hertz", 50e6, 3e9)
        check("sentinel_gpu_sm_clock_max_hertz", 500e6, 3e9)
        check("sentinel_gpu_memory_clock_hertz", 50e6, 20e9)
        check("sentinel_gpu_memory_clock_max_hertz", 500e6, 20e9)
        check("sentinel_gpu_power_watts", 5, 1500)
        check("sentinel_gpu_power_limit_watts", 50, 1500)
        total = _one(values, "sentinel_gpu_memory_total_bytes", g)
        check("sentinel_gpu_memory_total_bytes", 1 << 30, 1 << 40)
        check("sentinel_gpu_memory_used_bytes", 0, total or 1 << 40)
        check("sentinel_gpu_thermal_violation_seconds_total", 0, 1e9)
        check("sentinel_gpu_power_violation_seconds_total", 0, 1e9)
        check("sentinel_gpu_ecc_errors_total", 0, 1e6, type="corrected")
        check("sentinel_gpu_ecc_errors_total", 0, 1e6, type="uncorrected")
        check("sentinel_gpu_remapped_rows_total", 0, 1e4, cause="correctable")
        check("sentinel_gpu_remapped_rows_pending", 0, 1)
        check("sentinel_gpu_remapped_rows_failure", 0, 1)
        check("sentinel_gpu_pcie_replays_total", 0, 1e9)
        check("sentinel_gpu_poll_duration_seconds", 1e-6, 0.5)
        for src in ("gpm", "nvml"):
            check("sentinel_gpu_memory_bandwidth_utilization_ratio", 0, 1, source=src)
            check("sentinel_gpu_sm_utilization_ratio", 0, 1, source=src)
        sm, sm_max = dev.sm_clock_hz, dev.sm_clock_max_hz
        if sm is not None and sm_max is not None:
            assert sm <= sm_max * 1.01
        mask = dev.clocks_event_mask or 0
        active = {
            lab["reason"]
            for lab, v in values["sentinel_gpu_clocks_event_reason"]
            if lab["gpu"] == str(g) and v == 1.0
        }
        assert active == set(dev.reasons) and (mask == 0) == (not active)
        print(f"  active reasons: {sorted(active)}  xid events: {poller.xid is not None}")


def test_violation_fields_match_the_legacy_call(poller: GpuPoller) -> None:
    """Violation time comes from field values 74/75 in one batch; it must be the same
    quantity (ns) as nvmlDeviceGetViolationStatus."""
    lib = poller.nvml.lib
    for dev in poller.devices:
        snap = dev.sample()
        for policy, got in ((1, snap.thermal_violation_s), (0, snap.power_violation_s)):
            try:
                legacy = lib.nvmlDeviceGetViolationStatus(dev.handle, policy).violationTime * 1e-9
            except lib.NVMLError as exc:
                pytest.skip(f"nvmlDeviceGetViolationStatus: {exc}")
            print(f"\nGPU {dev.index} policy {policy}: fields {got} s, legacy {legacy} s")
            assert got is not None
            assert abs(got - legacy) <= max(1.0, 0.01 * legacy)


def test_prepared_field_values_read_what_pynvmls_wrapper_reads(poller: GpuPoller) -> None:
    """The poll's one prepared C call (fields.py) over pynvml's own structures gives the
    same per-field codes and values as pynvml's wrapper."""
    lib = poller.nvml.lib
    ids = [82, 3, 4, 142, 143, 144, 145]  # memory temperature, ECC, remapped rows
    for dev in poller.devices:
        reader = FieldValues(lib, dev.handle, ids)
        assert reader.prepared
        for _ in range(2):  # the same array, read twice
            mine = [(v.fieldId, v.nvmlReturn, v.value.ullVal) for v in reader.read()]
            theirs = [
                (v.fieldId, v.nvmlReturn, v.value.ullVal)
                for v in lib.nvmlDeviceGetFieldValues(dev.handle, ids)
            ]
            print(f"\nGPU {dev.index} prepared {mine}\n  wrapper {theirs}")
            assert [m[:2] for m in mine] == [t[:2] for t in theirs]
            for (fid, ret, got), (_, _, want) in zip(mine, theirs, strict=True):
                if ret == 0:  # memory temperature may move a degree between the reads
                    assert abs(int(got) - int(want)) <= (2 if fid == 82 else 0)


def test_slow_reads_are_made_between_polls(poller: GpuPoller) -> None:
    """Every slow read (expensive counters, graphics processes) comes round within
    slow_every refreshes, one per GPU at a time, and the next poll shows its cost."""
    for dev in poller.devices:
        print(f"\nGPU {dev.index} counter plan: {dev.counter_plan}")
        print(f"  read costs at open (s): {dev.read_costs}")
    names = {dev.index: {n for n, _ in dev.slow_reads()} for dev in poller.devices}
    rounds = max(dev.slow_every + len(names[dev.index]) for dev in poller.devices)
    for _ in range(rounds):
        done = poller.refresh_slow()
        assert all(index in names for index in done)
    snap = poller.poll_once()
    for dev in snap.devices:
        print(f"  slow reads (s): {dev.slow_read_durations_s}")
        assert set(dev.slow_read_durations_s) == names[dev.index]
        assert all(0 < t < 1.0 for t in dev.slow_read_durations_s.values())


def test_bandwidth_rises_under_a_device_to_device_copy_loop(
    poller: GpuPoller, registry: CollectorRegistry
) -> None:
    def bandwidth(n: int) -> list[float]:
        out = []
        for _ in range(n):
            time.sleep(0.5)
            snap = poller.poll_once()
            d = snap.devices[0]
            assert d.memory_bandwidth_ratio is not None
            out.append(d.memory_bandwidth_ratio)
        return out

    poller.poll_once()
    idle = bandwidth(3)
    proc = _copy_loop(seconds=20)
    try:
        status = poller.status
        assert status is not None
        status.set_processes([ProcessInfo(proc.pid, "worker", 1, time.time())])
        time.sleep(1.0)
        poller.poll_once()
        busy = bandwidth(4)
        values = _values(registry)
        source = poller.snapshot.devices[0].memory_bandwidth_source
        print(f"\nbandwidth source {source}: idle {idle} busy {busy}")
        if OUT:
            Path(OUT, "metrics_busy.txt").write_text(generate_latest(registry).decode())
            Path(OUT, "bandwidth.json").write_text(
                json.dumps({"source": source, "idle": idle, "busy": busy})
            )
        assert statistics.median(busy) > max(idle) + 0.2
        assert statistics.median(busy) > 0.3
        # the copy loop is "the engine's worker": its memory shows under its role
        worker = _one(values, "sentinel_gpu_engine_memory_bytes", 0, role="worker")
        print(f"worker memory on gpu 0: {worker}")
        assert worker is not None and worker >= 4 * 1024**3  # two 2 GiB buffers
        # the supervisor's view: a fresh NVML read finds the same process
        assert any(pid == proc.pid and used >= 4 * 1024**3 for pid, _, used in gpu_processes())
        assert (proc.pid, 0) in {(pid, gpu) for pid, gpu, _ in poller.gpu_processes()}
    finally:
        proc.kill()
        proc.wait()


def test_foreign_process_is_counted(poller: GpuPoller, registry: CollectorRegistry) -> None:
    proc = _copy_loop(seconds=5, gib=0.5)
    try:
        time.sleep(0.5)
        poller.poll_once()
        values = _values(registry)
        assert (_one(values, "sentinel_gpu_foreign_processes", 0) or 0) >= 1
        assert (_one(values, "sentinel_gpu_foreign_memory_bytes", 0) or 0) >= 1024**3
    finally:
        proc.kill()
        proc.wait()


def test_poll_thread_publishes_and_stops_promptly() -> None:
    p = GpuPoller(GpuConfig(poll_interval_s=0.2), EngineStatus())
    p.start()
    try:
        deadline = time.monotonic() + 10
        seen: set[float] = set()
        while time.monotonic() < deadline and len(seen) < 3:
            snap: GpuSnapshot = p.snapshot
            if snap.at is not None:
                seen.add(snap.at)
            time.sleep(0.05)
        assert len(seen) >= 3, p.snapshot
    finally:
        t0 = time.monotonic()
        p.stop()
        assert time.monotonic() - t0 < 1.5


def test_cli_shows_every_gpu() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, "-m", "sentinel", "gpu", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    nvml = load_nvml()
    try:
        assert len(data["devices"]) == nvml.device_count()
    finally:
        nvml.close()
    assert all(d["temperature_c"] is not None for d in data["devices"])
    table = subprocess.run(
        [sys.executable, "-m", "sentinel", "gpu"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "COLUMNS": "250"},
    )
    print(table.stdout)
    if OUT:
        Path(OUT, "sentinel_gpu.txt").write_text(table.stdout + table.stderr)
    model = data["devices"][0]["name"].split()[-1]  # e.g. "HBM3": a cell rich will not wrap
    assert table.returncode == 0 and model in table.stdout
