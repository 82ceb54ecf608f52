"""What one GPU poll saw: plain data, built in the poll thread and read by the
collector, the health check and the CLI (none of which call NVML). Nothing changes a
sample or a snapshot once built: the poll thread publishes a new one each poll.
(``slots`` and not ``frozen``: a frozen dataclass of 36 fields takes ~10 us to build,
4x a plain one, and the poll builds one per GPU every poll.)

A field the device does not support is ``None`` here and left out of /metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Clocks-event (throttle) reasons: name -> bit of nvmlDeviceGetCurrentClocksEventReasons.
CLOCKS_EVENT_REASONS: dict[str, int] = {
    "GPU_IDLE": 0x1,
    "APPLICATIONS_CLOCKS_SETTING": 0x2,
    "SW_POWER_CAP": 0x4,
    "HW_SLOWDOWN": 0x8,
    "SYNC_BOOST": 0x10,
    "SW_THERMAL": 0x20,
    "HW_THERMAL": 0x40,
    "HW_POWER_BRAKE": 0x80,
    "DISPLAY_CLOCKS": 0x100,
}


def active_reasons(mask: int | None) -> list[str]:
    """The named reasons set in a clocks-event mask, in bit order."""
    if not mask:
        return []
    return [name for name, bit in CLOCKS_EVENT_REASONS.items() if mask & bit]


@dataclass(slots=True)
class GpuProcess:
    pid: int
    used_bytes: int  # 0 where the driver does not report it
    role: str | None  # the engine process role; None for a process Sentinel did not start


@dataclass(slots=True)
class GpuSample:
    index: int
    uuid: str
    name: str
    lost: bool = False
    temperature_c: float | None = None
    memory_temperature_c: float | None = None
    clocks_event_mask: int | None = None
    memory_bandwidth_ratio: float | None = None
    memory_bandwidth_source: str | None = None  # "gpm" (DRAM_BW_UTIL) | "nvml"
    sm_utilization_ratio: float | None = None
    sm_utilization_source: str | None = None  # "gpm" (SM_UTIL) | "nvml"
    sm_clock_hz: float | None = None
    sm_clock_max_hz: float | None = None
    memory_clock_hz: float | None = None
    memory_clock_max_hz: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    thermal_violation_s: float | None = None
    power_violation_s: float | None = None
    ecc_corrected: int | None = None
    ecc_uncorrected: int | None = None
    remapped_correctable: int | None = None
    remapped_uncorrectable: int | None = None
    remapped_pending: int | None = None
    remapped_failure: int | None = None
    pcie_replays: int | None = None
    processes: tuple[GpuProcess, ...] | None = None
    # cumulative since Sentinel opened the device
    xid_counts: dict[int, int] = field(default_factory=dict)
    unsupported_reads: dict[str, int] = field(default_factory=dict)
    read_errors: dict[tuple[str, str], int] = field(default_factory=dict)
    poll_duration_s: float = 0.0
    # slow read (counter group, graphics_processes) -> how long its last read took;
    # slow reads happen between polls, not in ``poll_duration_s``
    slow_read_durations_s: dict[str, float] = field(default_factory=dict)

    @property
    def reasons(self) -> list[str]:
        return active_reasons(self.clocks_event_mask)


@dataclass(frozen=True)
class GpuSnapshot:
    available: bool
    at: float | None = None  # wall-clock time of the poll
    devices: tuple[GpuSample, ...] = ()
    reason: str = ""  # why NVML is unavailable (when it is)
    driver_version: str | None = None
