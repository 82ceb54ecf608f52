"""GPU thresholds -> EngineStatus degraded reasons (fake pynvml, fake clock)."""

from __future__ import annotations

import pydantic
import pytest

from sentinel.collectors.gpu.fake import FakeGpu, FakeNvml
from sentinel.collectors.gpu.nvml import load_nvml
from sentinel.collectors.gpu.poller import GpuPoller
from sentinel.collectors.gpu.sample import CLOCKS_EVENT_REASONS
from sentinel.config.schema import GpuConfig, GpuDegradedConfig
from sentinel.state import EngineState, EngineStatus, Lifecycle


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(
    gpus: list[FakeGpu], gpu_indices: tuple[int, ...] = (), **degraded: object
) -> tuple[FakeNvml, GpuPoller, EngineStatus, Clock]:
    lib = FakeNvml(gpus)
    status = EngineStatus()
    cfg = GpuConfig(degraded=GpuDegradedConfig(**degraded))
    poller = GpuPoller(cfg, status, gpu_indices=gpu_indices, load=lambda: load_nvml(lib))
    clock = Clock()
    assert poller.health is not None
    poller.health.clock = clock
    assert poller.open()
    return lib, poller, status, clock


def running(status: EngineStatus) -> None:
    status.new_generation()
    status.mark_loaded()
    assert status.lifecycle == Lifecycle.running


def test_healthy_gpu_sets_nothing() -> None:
    _, poller, status, _ = make([FakeGpu()])
    running(status)
    poller.poll_once()
    assert status.degraded_reasons() == {}
    assert status.state() == EngineState.ready


def test_temperature_at_threshold_degrades_then_clears() -> None:
    lib, poller, status, _ = make([FakeGpu(temperature=82)])
    running(status)
    poller.poll_once()
    assert status.degraded_reasons() == {"gpu": "gpu 0 temperature 82 C >= 82 C"}
    assert status.state() == EngineState.degraded
    snap = status.snapshot()
    assert snap["state"] == "degraded" and "gpu" in snap["degraded_reasons"]
    assert status.lifecycle == Lifecycle.running  # information only: no restart
    lib.gpus[0].temperature = 81
    poller.poll_once()
    assert status.degraded_reasons() == {}


@pytest.mark.parametrize("reason", ["HW_THERMAL", "HW_POWER_BRAKE", "HW_SLOWDOWN"])
def test_default_throttle_reasons_degrade(reason: str) -> None:
    _, poller, status, _ = make([FakeGpu(clocks_event_mask=CLOCKS_EVENT_REASONS[reason] | 1)])
    poller.poll_once()
    assert status.degraded_reasons()["gpu"] == f"gpu 0 clocks slowed by {reason}"


def test_benign_reasons_do_not_degrade() -> None:
    _, poller, status, _ = make([FakeGpu(clocks_event_mask=0x1 | 0x4 | 0x10)])
    poller.poll_once()
    assert status.degraded_reasons() == {}


def test_configured_reasons_replace_the_default() -> None:
    _, poller, status, _ = make([FakeGpu(clocks_event_mask=0x4)], throttle_reasons=["SW_POWER_CAP"])
    poller.poll_once()
    assert status.degraded_reasons() == {"gpu": "gpu 0 clocks slowed by SW_POWER_CAP"}


def test_every_xid_degrades_for_the_hold_time_then_clears() -> None:
    lib, poller, status, clock = make([FakeGpu()], xid_hold_s=60.0)
    poller.poll_once()
    lib.inject_xid(0, 48)
    lib.inject_xid(0, 48)
    lib.inject_xid(0, 79)
    poller.wait_events(0.1)
    poller.poll_once()
    assert status.degraded_reasons() == {"gpu": "gpu 0 XID 48 x2, XID 79 x1"}
    clock.t += 59
    poller.poll_once()
    assert "XID 48" in status.degraded_reasons()["gpu"]
    clock.t += 2
    poller.poll_once()
    assert status.degraded_reasons() == {}
    assert poller.snapshot.devices[0].xid_counts == {48: 2, 79: 1}


def test_xid_with_zero_hold_lasts_one_poll() -> None:
    lib, poller, status, _ = make([FakeGpu()], xid_hold_s=0.0)
    lib.inject_xid(0, 31)
    poller.wait_events(0.1)
    poller.poll_once()
    assert "XID 31" in status.degraded_reasons()["gpu"]
    poller.poll_once()
    assert status.degraded_reasons() == {}


def test_xid_ignored_when_on_xid_is_off() -> None:
    lib, poller, status, _ = make([FakeGpu()], on_xid=False)
    lib.inject_xid(0, 79)
    poller.wait_events(0.1)
    poller.poll_once()
    assert status.degraded_reasons() == {}
    assert poller.snapshot.devices[0].xid_counts == {79: 1}  # still counted


def test_lost_gpu_degrades() -> None:
    lib, poller, status, _ = make([FakeGpu(), FakeGpu(uuid="GPU-1")])
    lib.gpus[1].lost = True
    poller.poll_once()
    assert status.degraded_reasons()["gpu"].startswith("gpu 1 lost")


def test_only_the_engines_gpus_count_when_engine_gpu_indices_is_set() -> None:
    _, poller, status, _ = make([FakeGpu(), FakeGpu(temperature=90)], gpu_indices=(0,))
    poller.poll_once()
    assert status.degraded_reasons() == {}


def test_several_reasons_are_joined() -> None:
    _, poller, status, _ = make([FakeGpu(temperature=90, clocks_event_mask=0x40)])
    poller.poll_once()
    reason = status.degraded_reasons()["gpu"]
    assert "temperature 90 C" in reason and "HW_THERMAL" in reason and "; " in reason


def test_other_sources_are_left_alone() -> None:
    lib, poller, status, _ = make([FakeGpu(temperature=90)])
    status.set_degraded("probe", "slow")
    poller.poll_once()
    lib.gpus[0].temperature = 50
    poller.poll_once()
    assert status.degraded_reasons() == {"probe": "slow"}


def test_unknown_throttle_reason_in_config_is_named() -> None:
    with pytest.raises(pydantic.ValidationError, match="HW_TERMAL"):
        GpuDegradedConfig(throttle_reasons=["HW_TERMAL"])


def test_config_reason_names_match_the_nvml_bits() -> None:
    from typing import get_args

    from sentinel.config.schema import ClocksEventReason

    assert list(get_args(ClocksEventReason)) == list(CLOCKS_EVENT_REASONS)


@pytest.mark.parametrize("text, mode", [("off", "off"), ("on", "on"), ("auto", "auto")])
def test_yaml_on_off_mode_is_read_as_the_word(tmp_path, text: str, mode: str) -> None:
    from sentinel.config import load_config

    path = tmp_path / "sentinel.yaml"
    path.write_text(f"gpu:\n  mode: {text}\n")
    assert load_config(path).gpu.mode == mode
