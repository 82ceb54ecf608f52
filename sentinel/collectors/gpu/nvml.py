"""The boundary to NVML: the only module of Sentinel at run time that imports ``pynvml``
(nvidia-ml-py; the doctor loads NVML through ``load_nvml`` too). The library is injectable
for tests (``fake.FakeNvml``, which borrows pynvml's error and structure classes).

Every read is safe, in the style of gpustat: a field the device does not support
(NotSupported, FunctionNotFound, NoPermission) becomes ``None``, is counted once and
not asked again; another error becomes ``None`` and is counted each time (it may be
transient); GPU-is-lost (or reset-required) marks the whole device lost, and it is
not read again. NVML missing (no library, no driver) raises ``NvmlUnavailable`` once,
at load time.

The boundary by job:

- here: loading NVML (``load_nvml``), the session (``Nvml``: driver, devices) and the
  XID event set (``XidEvents``);
- ``nvml_codes``: NVML's return codes and enum values, ``GpuLost``, ``NvmlUnavailable``;
- ``device``: one GPU (``GpuDevice``): identity once, ``sample()`` every poll,
  utilization from GPM or NVML's rates, the process lists;
- ``counters``: the counters through field values or one-value calls, timed at open,
  cheap ones every poll, slow ones between polls (``refresh_slow``);
- ``fields``: one prepared nvmlDeviceGetFieldValues call.

What each NVML call costs, and so why reads are planned the way they are:
``docs/design/gpu.md``. Nothing here is thread-aware beyond what NVML itself guarantees
(it is thread-safe); one poll thread owns the ``GpuDevice`` objects.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from sentinel.collectors.gpu.counters import COUNTER_GROUPS, FAST_READ_S, CounterGroup
from sentinel.collectors.gpu.device import GpuDevice
from sentinel.collectors.gpu.nvml_codes import (
    EVENT_XID_CRITICAL,
    TIMEOUT,
    GpuLost,
    NvmlUnavailable,
    code_name,
    text,
)

__all__ = [
    "COUNTER_GROUPS",
    "FAST_READ_S",
    "CounterGroup",
    "GpuDevice",
    "GpuLost",
    "Nvml",
    "NvmlUnavailable",
    "XidEvents",
    "code_name",
    "load_nvml",
]


class Nvml:
    """One NVML session (nvmlInit .. nvmlShutdown) over a pynvml-like module."""

    def __init__(self, lib: Any) -> None:
        self.lib = lib
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self.lib.nvmlShutdown()
            except self.lib.NVMLError:
                pass

    def driver_version(self) -> str | None:
        try:
            return text(self.lib.nvmlSystemGetDriverVersion())
        except self.lib.NVMLError:
            return None

    def device_count(self) -> int:
        return int(self.lib.nvmlDeviceGetCount())

    def open_devices(self, slow_every: int = 1) -> list[GpuDevice]:
        """Every GPU, opened (a device that cannot be opened comes back lost)."""
        try:
            count = self.device_count()
        except self.lib.NVMLError as exc:
            self.close()
            raise NvmlUnavailable(f"NVML could not count the GPUs: {exc}") from None
        devices = []
        for index in range(count):
            device = GpuDevice(self.lib, index, slow_every)
            device.open()
            devices.append(device)
        return devices

    def xid_events(self, devices: list[GpuDevice]) -> XidEvents | None:
        """An event set with every device registered for XID events, or None when no
        device supports them (counted per device as field ``xid_events``)."""
        try:
            event_set = self.lib.nvmlEventSetCreate()
        except self.lib.NVMLError as exc:
            for device in devices:
                device.note_failure("xid_events", exc.value)
            return None
        registered = 0
        for device in devices:
            if device.lost:
                continue
            try:
                self.lib.nvmlDeviceRegisterEvents(device.handle, EVENT_XID_CRITICAL, event_set)
                registered += 1
            except self.lib.NVMLError as exc:
                try:
                    device.note_failure("xid_events", exc.value)
                except GpuLost:
                    device.lost = True
        if not registered:
            try:
                self.lib.nvmlEventSetFree(event_set)
            except self.lib.NVMLError:
                pass
            return None
        return XidEvents(self.lib, event_set, devices)


def load_nvml(lib: Any | None = None) -> Nvml:
    """Initialise NVML; raise ``NvmlUnavailable`` with the reason when it cannot be."""
    if lib is None:
        try:
            import pynvml as lib  # nvidia-ml-py
        except ImportError as exc:
            raise NvmlUnavailable(f"nvidia-ml-py is not installed ({exc})") from None
    try:
        lib.nvmlInit()
    except lib.NVMLError as exc:
        raise NvmlUnavailable(f"NVML could not be initialised: {exc}") from None
    except OSError as exc:
        raise NvmlUnavailable(f"NVML library could not be loaded: {exc}") from None
    return Nvml(lib)


class XidEvents:
    """XID critical-error events of every registered device, so that every one counts."""

    def __init__(self, lib: Any, event_set: Any, devices: list[GpuDevice]) -> None:
        self.lib = lib
        self.event_set = event_set
        self.devices = {d.index: d for d in devices}
        self.errors: Counter[str] = Counter()

    def wait(self, timeout_s: float) -> list[tuple[int, int]] | None:
        """Wait up to ``timeout_s`` for one event; return [(gpu index, xid)], [] on
        timeout, or None when waiting failed (the caller then sleeps instead)."""
        ms = max(1, int(timeout_s * 1000))
        try:
            data = self.lib.nvmlEventSetWait_v2(self.event_set, ms)
        except self.lib.NVMLError as exc:
            if exc.value == TIMEOUT:
                return []
            self.errors[code_name(exc.value)] += 1
            return None
        if not data.eventType & EVENT_XID_CRITICAL:
            return []
        try:
            index = int(self.lib.nvmlDeviceGetIndex(data.device))
        except self.lib.NVMLError:
            index = -1
        xid = int(data.eventData)
        device = self.devices.get(index)
        if device is not None:
            device.xid_counts[xid] += 1
        return [(index, xid)]

    def close(self) -> None:
        try:
            self.lib.nvmlEventSetFree(self.event_set)
        except self.lib.NVMLError:
            pass
