"""The NVML boundary (sentinel.collectors.gpu.nvml) against the fake pynvml: every
value, unit conversion and error path a device can produce."""

from __future__ import annotations

import pytest

from sentinel.collectors.gpu import counters
from sentinel.collectors.gpu.fake import FakeGpu, FakeNvml
from sentinel.collectors.gpu.nvml import GpuDevice, NvmlUnavailable, load_nvml

NOT_SUPPORTED, NO_PERMISSION, FUNCTION_NOT_FOUND, UNKNOWN = 3, 4, 13, 999


@pytest.fixture(autouse=True, params=["pynvml-wrapper", "prepared-c-call"])
def field_values_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test twice: field values through pynvml's wrapper (a module without
    pynvml's internals), and through the prepared C call that the real pynvml gets
    (``FakeNvml(ctypes_fields=True)``: pynvml's own structures, filled by a callback)."""
    if request.param == "prepared-c-call":
        monkeypatch.setattr(FakeNvml, "ctypes_fields_default", True)
    return request.param


def open_one(gpu: FakeGpu, slow_every: int = 1) -> tuple[FakeNvml, GpuDevice]:
    lib = FakeNvml([gpu])
    (device,) = load_nvml(lib).open_devices(slow_every=slow_every)
    return lib, device


def test_every_value_in_base_units() -> None:
    gpu = FakeGpu(
        temperature=71,
        memory_temperature=80,
        clocks_event_mask=0x48,
        sm_clock_mhz=1755,
        memory_clock_mhz=2619,
        power_mw=512_345,
        power_limit_mw=700_000,
        memory_used=3 * 1024**3,
        thermal_violation_ns=2_500_000_000,
        power_violation_ns=1_000_000,
        ecc_corrected=7,
        ecc_uncorrected=1,
        remapped=(2, 1, 1, 0),
        pcie_replay=12,
        gpm_dram_bw_util=64.0,
        gpm_sm_util=99.0,
    )
    _, device = open_one(gpu)
    first = device.sample()
    assert first.memory_bandwidth_ratio is None  # GPM needs two samples
    s = device.sample()
    assert (s.uuid, s.name, s.lost) == (gpu.uuid, gpu.name, False)
    assert s.temperature_c == 71 and s.memory_temperature_c == 80
    assert s.clocks_event_mask == 0x48 and s.reasons == ["HW_SLOWDOWN", "HW_THERMAL"]
    assert s.sm_clock_hz == 1755e6 and s.sm_clock_max_hz == 1980e6
    assert s.memory_clock_hz == 2619e6 and s.memory_clock_max_hz == 2619e6
    assert s.power_w == pytest.approx(512.345) and s.power_limit_w == 700.0
    assert s.memory_used_bytes == 3 * 1024**3 and s.memory_total_bytes == 80 * 1024**3
    assert s.thermal_violation_s == pytest.approx(2.5)
    assert s.power_violation_s == pytest.approx(0.001)
    assert (s.ecc_corrected, s.ecc_uncorrected) == (7, 1)
    assert (s.remapped_correctable, s.remapped_uncorrectable) == (2, 1)
    assert (s.remapped_pending, s.remapped_failure) == (1, 0)
    assert s.pcie_replays == 12
    assert (s.memory_bandwidth_ratio, s.memory_bandwidth_source) == (0.64, "gpm")
    assert (s.sm_utilization_ratio, s.sm_utilization_source) == (0.99, "gpm")
    assert s.unsupported_reads == {} and s.read_errors == {}
    assert s.poll_duration_s > 0


def test_max_clocks_and_identity_are_read_once() -> None:
    gpu = FakeGpu()
    _, device = open_one(gpu)
    for _ in range(5):
        device.sample()
    assert gpu.calls["nvmlDeviceGetMaxClockInfo"] == 2
    assert gpu.calls["nvmlDeviceGetUUID"] == 1
    assert gpu.calls["nvmlDeviceGetTemperature"] == 5


def test_without_gpm_bandwidth_comes_from_nvml_utilization() -> None:
    gpu = FakeGpu(gpm_supported=False, util_memory=37, util_gpu=80)
    _, device = open_one(gpu)
    s = device.sample()  # no GPM: available from the first poll
    assert (s.memory_bandwidth_ratio, s.memory_bandwidth_source) == (0.37, "nvml")
    assert (s.sm_utilization_ratio, s.sm_utilization_source) == (0.80, "nvml")
    assert s.unsupported_reads == {"gpm": 1}
    assert "nvmlGpmSampleGet" not in gpu.calls


def test_gpm_metric_failure_falls_back_for_that_metric_only() -> None:
    gpu = FakeGpu(gpm_metric_fail={10: NOT_SUPPORTED}, util_memory=20, gpm_sm_util=50.0)
    _, device = open_one(gpu)
    device.sample()
    s = device.sample()
    assert (s.memory_bandwidth_ratio, s.memory_bandwidth_source) == (0.20, "nvml")
    assert (s.sm_utilization_ratio, s.sm_utilization_source) == (0.50, "gpm")
    assert s.unsupported_reads.get("gpm_dram_bw_util") == 1


def test_gpm_query_not_supported_uses_nvml() -> None:
    gpu = FakeGpu(fail={"nvmlGpmQueryDeviceSupport": NOT_SUPPORTED}, util_memory=5)
    _, device = open_one(gpu)
    s = device.sample()
    assert s.memory_bandwidth_source == "nvml" and s.unsupported_reads["gpm"] == 1


@pytest.mark.parametrize("code", [NOT_SUPPORTED, NO_PERMISSION, FUNCTION_NOT_FOUND])
def test_unsupported_call_is_absent_counted_once_and_not_asked_again(code: int) -> None:
    gpu = FakeGpu(fail={"nvmlDeviceGetTemperature": code})
    _, device = open_one(gpu)
    for _ in range(4):
        s = device.sample()
    assert s.temperature_c is None
    assert s.power_limit_w == 700.0  # the rest still read
    assert s.unsupported_reads == {"temperature": 1}
    assert gpu.calls["nvmlDeviceGetTemperature"] == 1


def test_power_draw_rides_in_the_field_values_batch() -> None:
    gpu = FakeGpu(power_mw=312_000)
    _, device = open_one(gpu, slow_every=10)
    before = gpu.calls.get("nvmlDeviceGetPowerUsage", 0)
    gpu.field_calls.clear()
    for _ in range(3):
        s = device.sample()
    assert s.power_w == 312.0
    assert all(185 in ids for ids in gpu.field_calls)
    assert gpu.calls.get("nvmlDeviceGetPowerUsage", 0) == before  # timed at open only


@pytest.mark.parametrize("code", [NOT_SUPPORTED, NO_PERMISSION])
def test_power_draw_without_its_field_falls_back_to_the_older_call(code: int) -> None:
    # before Ampere (and on GA100) field 185 is unsupported, nvmlDeviceGetPowerUsage works
    gpu = FakeGpu(power_mw=250_500, field_fail={185: code})
    _, device = open_one(gpu)
    for _ in range(3):
        s = device.sample()
    assert s.power_w == pytest.approx(250.5)
    assert device.counter_plan["power"] == "legacy, every poll"
    assert s.unsupported_reads == {}  # the value is there: nothing to count


def test_power_draw_unsupported_both_ways_is_absent_and_counted_once() -> None:
    gpu = FakeGpu(fail={"nvmlDeviceGetPowerUsage": NOT_SUPPORTED}, field_fail={185: NOT_SUPPORTED})
    _, device = open_one(gpu)
    for _ in range(4):
        s = device.sample()
    assert s.power_w is None and s.power_limit_w == 700.0
    assert s.unsupported_reads == {"power": 1}


def test_the_power_limit_is_a_setting_read_between_polls() -> None:
    gpu = FakeGpu(power_limit_mw=700_000)
    _, device = open_one(gpu, slow_every=10)
    assert device.counter_plan["power_limit"] == "legacy, every 10 polls, between polls"
    calls = gpu.calls["nvmlDeviceGetEnforcedPowerLimit"]
    gpu.power_limit_mw = 500_000  # an operator lowers it
    for _ in range(3):
        s = device.sample()
    assert gpu.calls["nvmlDeviceGetEnforcedPowerLimit"] == calls  # no poll reads it
    assert s.power_limit_w == 700.0
    reads = [device.refresh_slow() for _ in range(10)]
    assert "power_limit" in {r[0] for r in reads if r}
    assert device.sample().power_limit_w == 500.0  # within slow_every polls


def test_the_compute_process_list_is_read_again_when_memory_use_changes() -> None:
    gpu = FakeGpu(compute_processes=[(100, 1 << 30)], memory_used=1 << 30)
    _, device = open_one(gpu, slow_every=5)
    device.sample()
    calls = gpu.calls["nvmlDeviceGetComputeRunningProcesses"]
    for _ in range(3):  # nothing changed: the last list stands
        s = device.sample(roles={100: "worker"})
    assert gpu.calls["nvmlDeviceGetComputeRunningProcesses"] == calls
    assert [(p.pid, p.role) for p in s.processes or ()] == [(100, "worker")]  # roles now
    # a foreign process allocates: memory used moves, the next poll lists it
    gpu.compute_processes.append((777, 2 << 30))
    gpu.memory_used += 2 << 30
    s = device.sample()
    assert [p.pid for p in s.processes or ()] == [100, 777]
    # an unchanged total still gets a fresh list every slow_every polls
    gpu.compute_processes = [(100, 1 << 30), (778, 2 << 30)]  # same bytes, new pid
    seen = [[p.pid for p in device.sample().processes or ()] for _ in range(5)]
    assert seen[-1] == [100, 778] and seen[0] == [100, 777]


def test_unsupported_field_value_is_absent_and_counted() -> None:
    gpu = FakeGpu(field_fail={82: NOT_SUPPORTED})  # memory temperature
    _, device = open_one(gpu)
    for _ in range(3):
        s = device.sample()
    assert s.memory_temperature_c is None and s.temperature_c == 40
    assert s.unsupported_reads == {"memory_temperature": 1}


def test_transient_error_is_absent_counted_each_time_and_retried() -> None:
    gpu = FakeGpu(fail={"nvmlDeviceGetTemperature": UNKNOWN})
    _, device = open_one(gpu)
    device.sample()
    s = device.sample()
    assert s.temperature_c is None
    assert s.read_errors == {("temperature", "unknown"): 2}
    del gpu.fail["nvmlDeviceGetTemperature"]
    assert device.sample().temperature_c == 40  # recovered: asked again


def test_without_field_values_the_legacy_calls_give_the_same_counters() -> None:
    values = dict(
        thermal_violation_ns=3_000_000_000,
        power_violation_ns=4_000_000_000,
        ecc_corrected=5,
        ecc_uncorrected=2,
        remapped=(3, 1, 0, 1),
        pcie_replay=9,
    )
    _, batch = open_one(FakeGpu(**values))
    legacy_gpu = FakeGpu(**values, fail={"nvmlDeviceGetFieldValues": FUNCTION_NOT_FOUND})
    _, legacy = open_one(legacy_gpu)
    a, b = batch.sample(), legacy.sample()
    for name in (
        "thermal_violation_s",
        "power_violation_s",
        "ecc_corrected",
        "ecc_uncorrected",
        "remapped_correctable",
        "remapped_uncorrectable",
        "remapped_pending",
        "remapped_failure",
        "pcie_replays",
    ):
        assert getattr(a, name) == getattr(b, name) is not None, name
    assert b.memory_temperature_c is None  # only readable as a field
    assert b.unsupported_reads["field_values"] == 1
    assert legacy_gpu.calls["nvmlDeviceGetViolationStatus"] >= 2


def test_gpu_lost_mid_run_marks_it_lost_and_stops_reading_it() -> None:
    lib = FakeNvml([FakeGpu(), FakeGpu(uuid="GPU-1")])
    devices = load_nvml(lib).open_devices()
    devices[1].sample()
    lib.gpus[1].lost = True
    s0, s1 = devices[0].sample(), devices[1].sample()
    assert not s0.lost and s0.temperature_c == 40
    assert s1.lost and s1.temperature_c is None and s1.uuid == "GPU-1"
    calls = sum(lib.gpus[1].calls.values())
    devices[1].sample()
    assert sum(lib.gpus[1].calls.values()) == calls  # not read again


def test_gpu_lost_at_open() -> None:
    lib = FakeNvml([FakeGpu(lost=True), FakeGpu()])
    devices = load_nvml(lib).open_devices()
    assert devices[0].lost and devices[0].sample().lost
    assert not devices[1].lost


def test_lost_inside_a_field_value() -> None:
    gpu = FakeGpu(field_fail={82: 15})
    _, device = open_one(gpu)
    assert device.lost and device.sample().lost


@pytest.mark.parametrize("code", [12, 9])  # library not found, driver not loaded
def test_nvml_missing_raises_unavailable_with_the_reason(code: int) -> None:
    with pytest.raises(NvmlUnavailable, match="NVML could not be initialised"):
        load_nvml(FakeNvml(init_error=code))


def test_real_pynvml_without_a_driver_is_unavailable() -> None:
    try:
        nvml = load_nvml()
    except NvmlUnavailable as exc:
        assert "NVML" in str(exc)
        return
    nvml.close()
    pytest.skip("this machine has NVML")


def test_processes_roles_owned_and_foreign() -> None:
    gpu = FakeGpu(
        compute_processes=[(100, 4 << 30), (101, 1 << 30), (300, 2 << 30), (400, None)],
        graphics_processes=[(100, 4 << 30), (500, 1 << 20)],
    )
    _, device = open_one(gpu)
    s = device.sample(roles={100: "worker"}, owned={101})
    procs = {p.pid: (p.used_bytes, p.role) for p in s.processes or ()}
    assert procs == {
        100: (4 << 30, "worker"),  # listed twice (compute + graphics): counted once
        101: (1 << 30, "other"),
        300: (2 << 30, None),
        400: (0, None),  # the driver gave no figure
        500: (1 << 20, None),
    }


def test_processes_unsupported_is_absent() -> None:
    gpu = FakeGpu(
        fail={
            "nvmlDeviceGetComputeRunningProcesses": NOT_SUPPORTED,
            "nvmlDeviceGetGraphicsRunningProcesses": NOT_SUPPORTED,
        }
    )
    _, device = open_one(gpu)
    s = device.sample()
    assert s.processes is None
    assert s.unsupported_reads == {"compute_processes": 1, "graphics_processes": 1}


def test_cheap_counters_are_read_in_one_field_values_call_per_poll() -> None:
    gpu = FakeGpu(memory_temperature=50, ecc_corrected=3, remapped=(1, 0, 0, 0))
    _, device = open_one(gpu, slow_every=10)
    assert device.counter_plan["ecc"].startswith("fields (one call for all)")
    gpu.field_calls.clear()
    legacy = gpu.calls.get("nvmlDeviceGetTotalEccErrors")
    s = device.sample()
    assert len(gpu.field_calls) == 1
    # every cheap group's fields in that one call (the fake is fast: all are cheap)
    assert set(gpu.field_calls[0]) == {82, 3, 4, 142, 143, 144, 145, 94, 75, 74, 185}
    assert (s.memory_temperature_c, s.ecc_corrected, s.remapped_correctable) == (50, 3, 1)
    assert gpu.calls.get("nvmlDeviceGetTotalEccErrors") == legacy  # timed at open only


def test_one_field_failing_inside_the_batch_leaves_the_others() -> None:
    gpu = FakeGpu(ecc_corrected=5, pcie_replay=7)
    _, device = open_one(gpu)
    gpu.field_fail[94] = UNKNOWN  # transient, in one field of the batch
    s = device.sample()
    assert s.pcie_replays is None and s.ecc_corrected == 5
    assert s.read_errors == {("pcie_replay", "unknown"): 1}
    gpu.field_fail[94] = NOT_SUPPORTED
    device.sample()
    gpu.field_calls.clear()
    s = device.sample()
    assert 94 not in gpu.field_calls[0] and s.unsupported_reads == {"pcie_replay": 1}
    assert s.ecc_corrected == 5


def test_slow_reads_happen_between_polls_one_at_a_time_each_every_slow_every(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(counters, "FAST_READ_S", -1.0)  # every counter group is "slow"
    gpu = FakeGpu(pcie_replay=1, graphics_processes=[(900, 1 << 20)])
    every = 2 * (len(counters.COUNTER_GROUPS) + 1)  # each slow read every 2 calls
    _, device = open_one(gpu, slow_every=every)
    s = device.sample()
    assert s.pcie_replays == 1  # read at open: present from the first poll
    assert [p.pid for p in s.processes or ()] == [900]
    assert all(f"every {every} polls, between polls" in p for p in device.counter_plan.values())
    # a poll never makes a slow read
    before = dict(gpu.calls)
    gpu.pcie_replay = 2
    for _ in range(5):
        s = device.sample()
    slow = ("nvmlDeviceGetFieldValues", "nvmlDeviceGetGraphicsRunningProcesses")
    assert all(gpu.calls.get(f) == before.get(f) for f in slow)
    assert s.pcie_replays == 1 and s.slow_read_durations_s == {}
    # between polls: at most one read a call, each slow read every `every` calls
    names = [r[0] for r in device.slow_reads()]
    assert names == [g.name for g in counters.COUNTER_GROUPS] + ["graphics_processes"]
    done = [device.refresh_slow() for _ in range(every * 2)]
    reads = [r[0] for r in done if r is not None]
    assert all(r is None or r[1] >= 0 for r in done)
    assert set(reads) == set(names) and all(reads.count(n) == 2 for n in names)
    s = device.sample()
    assert s.pcie_replays == 2  # refreshed, exposed by the next poll
    assert set(s.slow_read_durations_s) == set(names)


def test_graphics_processes_are_a_slow_read() -> None:
    gpu = FakeGpu(compute_processes=[(100, 1 << 30)])
    _, device = open_one(gpu, slow_every=1)
    gpu.graphics_processes = [(200, 1 << 20)]
    s = device.sample()
    assert [p.pid for p in s.processes or ()] == [100]  # the list read at open
    reads = [device.refresh_slow() for _ in range(len(device.slow_reads()))]
    assert "graphics_processes" in {r[0] for r in reads if r}
    s = device.sample()
    assert [p.pid for p in s.processes or ()] == [100, 200]


def test_a_refresh_that_finds_the_gpu_lost_marks_it_lost() -> None:
    gpu = FakeGpu()
    _, device = open_one(gpu, slow_every=1)
    gpu.lost = True
    assert device.refresh_slow() is None and device.lost
    assert device.sample().lost


def test_a_cheap_batched_counter_that_turns_expensive_is_demoted_after_3_polls() -> None:
    gpu = FakeGpu(pcie_replay=4)
    _, device = open_one(gpu, slow_every=10)
    assert device.counter_plan["pcie_replay"].endswith("every poll")
    gpu.field_latency_us[94] = 2000  # the driver says: this field took 2 ms
    device.sample()
    device.sample()
    assert device.counter_plan["pcie_replay"].endswith("every poll")  # not on 2 slow reads
    device.sample()
    assert device.counter_plan["pcie_replay"] == "fields, every 10 polls, between polls"
    assert device.counter_plan["ecc"].endswith("every poll")  # the rest stay in the batch
    gpu.field_calls.clear()
    gpu.pcie_replay = 5
    s = device.sample()
    assert 94 not in gpu.field_calls[0] and s.pcie_replays == 4  # not read by the poll
    reads = [device.refresh_slow() for _ in range(10)]
    assert "pcie_replay" in {r[0] for r in reads if r}
    assert device.sample().pcie_replays == 5  # refreshed between polls


def test_a_cheap_legacy_counter_that_turns_expensive_is_demoted_after_3_polls() -> None:
    gpu = FakeGpu(pcie_replay=4, fail={"nvmlDeviceGetFieldValues": FUNCTION_NOT_FOUND})
    _, device = open_one(gpu, slow_every=10)
    assert device.counter_plan["pcie_replay"] == "legacy, every poll"
    gpu.delay_s["nvmlDeviceGetPcieReplayCounter"] = 0.002
    for _ in range(3):
        device.sample()
    assert device.counter_plan["pcie_replay"] == "legacy, every 10 polls, between polls"


def test_a_one_off_slow_read_does_not_demote() -> None:
    gpu = FakeGpu()
    _, device = open_one(gpu, slow_every=10)
    plan = dict(device.counter_plan)
    for i in range(6):
        gpu.field_latency_us[94] = 2000 if i % 2 == 0 else 0
        device.sample()
    assert device.counter_plan == plan
