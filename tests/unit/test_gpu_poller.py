"""The poll thread, XID events, NVML-missing behaviour, gpu_processes() and the CLI
(fake pynvml)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
from typer.testing import CliRunner

from sentinel.collectors.gpu import gpu_processes
from sentinel.collectors.gpu import nvml as nvml_mod
from sentinel.collectors.gpu.fake import FakeGpu, FakeNvml
from sentinel.collectors.gpu.nvml import NvmlUnavailable, load_nvml
from sentinel.collectors.gpu.poller import GpuPoller
from sentinel.config.schema import GpuConfig
from sentinel.state import EngineStatus
from tests.helpers import wait_for


def poller_for(lib: FakeNvml, **cfg: object) -> GpuPoller:
    return GpuPoller(GpuConfig(**cfg), EngineStatus(), load=lambda: load_nvml(lib))


def test_thread_polls_at_the_interval_and_stops_promptly() -> None:
    lib = FakeNvml([FakeGpu()])
    p = poller_for(lib, poll_interval_s=0.1)
    p.start()
    try:
        first = wait_for(lambda: p.snapshot.at, 5, what="first poll")
        wait_for(lambda: (p.snapshot.at or 0) > first + 0.25, 5, what="later polls")
        assert p._thread is not None and p._thread.name == "sentinel-gpu-poller"
        assert p._thread is not threading.main_thread()
    finally:
        t0 = time.monotonic()
        p.stop()
        assert time.monotonic() - t0 < 1.0
    assert lib.initialised == 0  # nvmlShutdown balanced nvmlInit
    assert lib.event_set_freed


def test_thread_makes_the_slow_reads_between_polls_not_in_them() -> None:
    gpu = FakeGpu(graphics_processes=[(900, 1 << 20)])
    lib = FakeNvml([gpu])
    p = poller_for(lib, poll_interval_s=0.05, slow_counters_interval_s=0.05)
    assert p.open()
    before = gpu.calls.get("nvmlDeviceGetGraphicsRunningProcesses")
    for _ in range(3):
        p.poll_once()
    assert gpu.calls.get("nvmlDeviceGetGraphicsRunningProcesses") == before  # not in a poll
    got = [p.refresh_slow() for _ in range(3)]  # the power limit, the graphics processes
    assert all(list(g) == [0] for g in got if g)
    assert "graphics_processes" in {g[0][0] for g in got if g}
    assert gpu.calls.get("nvmlDeviceGetGraphicsRunningProcesses") == before + 1
    p.close()

    def refreshed() -> bool:
        devices = p.snapshot.devices
        return bool(devices) and "graphics_processes" in devices[0].slow_read_durations_s

    p = poller_for(lib, poll_interval_s=0.05, slow_counters_interval_s=0.05)
    p.start()
    try:
        wait_for(refreshed, 5, what="a slow read between polls, exposed by the next poll")
    finally:
        p.stop()


def test_every_xid_counts_between_polls() -> None:
    lib = FakeNvml([FakeGpu(), FakeGpu(uuid="GPU-1")])
    p = poller_for(lib, poll_interval_s=5.0)  # a long interval: events still count
    p.start()
    try:
        wait_for(lambda: p.snapshot.at, 5, what="first poll")
        for _ in range(3):
            lib.inject_xid(1, 79)
        lib.inject_xid(0, 13)
        wait_for(lambda: not lib.events, 5, what="events drained")
        assert dict(p.devices[1].xid_counts) == {79: 3}
        assert dict(p.devices[0].xid_counts) == {13: 1}
    finally:
        p.stop()


def test_xid_registration_unsupported_is_counted_and_polling_goes_on() -> None:
    lib = FakeNvml([FakeGpu()])
    lib.register_fail[0] = 3
    p = poller_for(lib)
    assert p.open()
    assert p.xid is None
    snap = p.poll_once()
    assert snap.devices[0].unsupported_reads["xid_events"] == 1
    assert snap.devices[0].temperature_c == 40
    t0 = time.monotonic()
    p.wait_events(0.2)  # no event set: plain wait
    assert time.monotonic() - t0 >= 0.15
    p.close()


def test_nvml_missing_available_zero_one_info_line_and_no_thread_loop(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    lib = FakeNvml(init_error=12)
    p = poller_for(lib)
    p.start()
    assert p._thread is not None
    p._thread.join(2)
    assert not p._thread.is_alive()  # the thread ended: nothing polls, nothing logs
    assert p.snapshot.available is False
    assert "NVML" in p.snapshot.reason
    out = capsys.readouterr()
    lines = [ln for ln in (out.out + out.err).splitlines() if "gpu telemetry" in ln]
    assert len(lines) == 1 and "unavailable" in lines[0] and "info" in lines[0]
    p.stop()


def test_mode_on_warns_when_nvml_is_missing(capsys: pytest.CaptureFixture[str]) -> None:
    p = poller_for(FakeNvml(init_error=9), mode="on")
    assert not p.open()
    out = capsys.readouterr()
    assert "warning" in out.out + out.err


def test_mode_off_never_loads_nvml() -> None:
    def load() -> nvml_mod.Nvml:
        raise AssertionError("NVML loaded with gpu.mode off")

    p = GpuPoller(GpuConfig(mode="off"), EngineStatus(), load=load)
    assert not p.open()
    assert p.snapshot.available is False and p.snapshot.reason == "gpu.mode is off"


class CountFails(FakeNvml):
    def nvmlDeviceGetCount(self) -> int:
        raise self.NVMLError(999)


def test_device_count_failing_is_unavailable() -> None:
    lib = CountFails([FakeGpu()])
    p = poller_for(lib)
    assert not p.open()
    assert "could not count" in p.snapshot.reason and lib.initialised == 0


def test_no_gpu_is_unavailable() -> None:
    p = poller_for(FakeNvml([]))
    assert not p.open()
    assert p.snapshot.reason == "NVML found no GPU"


def test_run_task_starts_and_stops_with_cancellation() -> None:
    lib = FakeNvml([FakeGpu()])
    p = poller_for(lib, poll_interval_s=0.05)

    async def main() -> None:
        task = asyncio.create_task(p.run())
        for _ in range(100):
            await asyncio.sleep(0.02)
            if p.snapshot.at:
                break
        assert p.snapshot.available and p.snapshot.at
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert p._thread is None and lib.initialised == 0


def test_poller_gpu_processes_from_the_last_poll() -> None:
    lib = FakeNvml([FakeGpu(compute_processes=[(10, 100)]), FakeGpu(compute_processes=[(11, 5)])])
    p = poller_for(lib)
    assert p.open()
    assert p.gpu_processes() == []
    p.poll_once()
    assert p.gpu_processes() == [(10, 0, 100), (11, 1, 5)]
    p.close()


def test_gpu_processes_reads_nvml_now() -> None:
    lib = FakeNvml([FakeGpu(compute_processes=[(7, 1 << 30)]), FakeGpu(lost=True)])
    assert gpu_processes(lambda: load_nvml(lib)) == [(7, 0, 1 << 30)]
    assert lib.initialised == 0


def test_gpu_processes_without_nvml_is_empty() -> None:
    def load() -> nvml_mod.Nvml:
        raise NvmlUnavailable("no NVML")

    assert gpu_processes(load) == []


# ---- CLI --------------------------------------------------------------------
def cli(monkeypatch: pytest.MonkeyPatch, lib: FakeNvml, *args: str) -> tuple[int, str, str]:
    from sentinel.cli.main import _register_optional, app

    real = nvml_mod.load_nvml
    monkeypatch.setattr(nvml_mod, "load_nvml", lambda _=None: real(lib))
    monkeypatch.setenv("COLUMNS", "250")
    _register_optional()
    result = CliRunner().invoke(app, ["gpu", "--interval", "0.05", *args])
    return result.exit_code, result.stdout, result.stderr


def test_cli_table(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = FakeGpu(temperature=77, clocks_event_mask=0x41, compute_processes=[(4242, 3 << 30)])
    code, out, _ = cli(monkeypatch, FakeNvml([gpu]), "--json")
    assert code == 0
    data = json.loads(out)
    dev = data["devices"][0]
    assert dev["temperature_c"] == 77 and dev["reasons"] == ["GPU_IDLE", "HW_THERMAL"]
    code, out, _ = cli(monkeypatch, FakeNvml([gpu]))
    assert code == 0
    assert "HBM3" in out and "77 / 45 C" in out and "HW_THERMAL" in out and "4242" in out


def test_cli_without_gpu_exits_1_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = cli(monkeypatch, FakeNvml(init_error=12))
    assert code == 1
    assert "no GPU to show" in err and "NVML" in err
    assert out == ""


def test_cli_lost_gpu_row(monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = cli(monkeypatch, FakeNvml([FakeGpu(lost=True)]))
    assert code == 0 and "LOST" in out
