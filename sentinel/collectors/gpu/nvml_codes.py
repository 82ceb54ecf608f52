"""NVML's numbers (return codes, enum values of the C ABI) and the two errors the
boundary raises. No NVML call here: what every module of the boundary shares."""

from __future__ import annotations

from typing import Any

# NVML return codes (the C ABI; pynvml's NVML_ERROR_* have the same values).
SUCCESS = 0
NOT_SUPPORTED = 3
NO_PERMISSION = 4
TIMEOUT = 10
FUNCTION_NOT_FOUND = 13
GPU_IS_LOST = 15
RESET_REQUIRED = 16
PERMANENT = {NOT_SUPPORTED, NO_PERMISSION, FUNCTION_NOT_FOUND}
LOST = {GPU_IS_LOST, RESET_REQUIRED}
_CODE_NAMES = {
    1: "uninitialized",
    2: "invalid_argument",
    3: "not_supported",
    4: "no_permission",
    6: "not_found",
    7: "insufficient_size",
    9: "driver_not_loaded",
    10: "timeout",
    11: "irq_issue",
    13: "function_not_found",
    14: "corrupted_inforom",
    15: "gpu_is_lost",
    16: "reset_required",
    17: "operating_system",
    20: "memory",
    999: "unknown",
}

TEMPERATURE_GPU = 0
CLOCK_SM = 1
CLOCK_MEM = 2
PERF_POLICY_POWER = 0
PERF_POLICY_THERMAL = 1
EVENT_XID_CRITICAL = 0x8
GPM_SM_UTIL = 2
GPM_DRAM_BW_UTIL = 10
MHZ = 1_000_000.0
NS = 1e-9


class NvmlUnavailable(Exception):
    """NVML cannot be used here: nvidia-ml-py, the library or the driver is missing."""


class GpuLost(Exception):
    """The device fell off the bus or needs a reset; nothing more can be read from it."""


def code_name(code: int) -> str:
    return _CODE_NAMES.get(code, f"error_{code}")


def text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
