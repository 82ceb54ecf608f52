"""An in-memory NVML with pynvml's surface, for unit tests and the CPU bench.

Only the functions ``nvml.py`` calls exist. Errors are pynvml's own ``NVMLError``
classes (nvidia-ml-py is a pure-Python package: importing it needs no driver), so
the code under test sees exactly what it would see from the real library.

Faults: ``FakeGpu.fail[function name] = code`` makes that call raise;
``FakeGpu.field_fail[field id] = code`` makes one field of
nvmlDeviceGetFieldValues come back with that return code (a field id the fake does
not know comes back NotSupported); ``FakeGpu.lost = True``
makes every call on the device raise GPU_IS_LOST; ``FakeGpu.delay_s[function name]``
makes that call slow, ``FakeGpu.field_latency_us[field id]`` one field of a
field-values call (reported as its ``latencyUsec``); ``FakeNvml(init_error=code)``
makes nvmlInit fail (e.g. 12: library not found, 9: driver not loaded).

``FakeNvml(ctypes_fields=True)`` also has the two pynvml internals that
``fields.FieldValues`` prepares its one C call with, the C function being a ctypes
callback that fills pynvml's own ``c_nvmlFieldValue_t`` array in place: the same
faults then reach the poll through the path the real library takes.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml

NVMLError = pynvml.NVMLError
_VALUE_MEMBERS = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal"}
# nvmlDeviceGetFieldValues(device, count, values*) as a C function
_C_FIELD_VALUES = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.py_object, ctypes.c_int32, ctypes.c_void_p)
NOT_SUPPORTED = 3
GPU_IS_LOST = 15
TIMEOUT = 10


@dataclass
class FakeGpu:
    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    temperature: int = 40
    memory_temperature: int = 45
    clocks_event_mask: int = 0x1
    util_gpu: int = 0
    util_memory: int = 0
    sm_clock_mhz: int = 345
    memory_clock_mhz: int = 2619
    sm_clock_max_mhz: int = 1980
    memory_clock_max_mhz: int = 2619
    power_mw: int = 70_000
    power_limit_mw: int = 700_000
    memory_total: int = 80 * 1024**3
    memory_used: int = 512 * 1024**2
    thermal_violation_ns: int = 0
    power_violation_ns: int = 0
    ecc_corrected: int = 0
    ecc_uncorrected: int = 0
    remapped: tuple[int, int, int, int] = (0, 0, 0, 0)
    pcie_replay: int = 0
    compute_processes: list[tuple[int, int | None]] = field(default_factory=list)
    graphics_processes: list[tuple[int, int | None]] = field(default_factory=list)
    gpm_supported: bool = True
    gpm_dram_bw_util: float = 1.5
    gpm_sm_util: float = 0.0
    gpm_metric_fail: dict[int, int] = field(default_factory=dict)
    fail: dict[str, int] = field(default_factory=dict)
    field_fail: dict[int, int] = field(default_factory=dict)
    # field id -> the driver's time for it (latencyUsec); the call sleeps that long
    field_latency_us: dict[int, int] = field(default_factory=dict)
    field_calls: list[list[int]] = field(default_factory=list)  # ids of each call
    lost: bool = False
    delay_s: dict[str, float] = field(default_factory=dict)  # function name -> added latency
    calls: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class FakeHandle:
    index: int


class _FakeMetricsGet:
    def __init__(self) -> None:
        self.version = 0
        self.numMetrics = 0
        self.sample1: Any = None
        self.sample2: Any = None
        self.metrics = [SimpleNamespace(metricId=0, nvmlReturn=0, value=0.0) for _ in range(16)]


class FakeNvml:
    """pynvml-like module over a list of ``FakeGpu``."""

    NVMLError = NVMLError
    NVML_GPM_METRICS_GET_VERSION = 1
    c_nvmlGpmMetricsGet_t = _FakeMetricsGet
    # what ``ctypes_fields`` is when not given (a test module may run everything both ways)
    ctypes_fields_default = False

    def __init__(
        self,
        gpus: list[FakeGpu] | None = None,
        init_error: int | None = None,
        *,
        ctypes_fields: bool | None = None,
    ) -> None:
        self.gpus = gpus if gpus is not None else [FakeGpu()]
        self.init_error = init_error
        self.initialised = 0
        self.events: deque[tuple[int, int]] = deque()
        self.registered: set[int] = set()
        self.event_set_freed = False
        self.register_fail: dict[int, int] = {}
        self._cond = threading.Condition()
        # address of the c_nvmlFieldValue_t array of each C field-values call
        self.c_field_arrays: list[int] = []
        if ctypes_fields if ctypes_fields is not None else self.ctypes_fields_default:
            # pynvml's internals, as the real module has them: FieldValues then calls
            # the "C function" (a ctypes callback) over pynvml's own structures
            c_fn = _C_FIELD_VALUES(self._c_field_values)
            self.c_nvmlFieldValue_t = pynvml.c_nvmlFieldValue_t
            self._nvmlGetFunctionPointer = lambda name: (
                c_fn if name == "nvmlDeviceGetFieldValues" else None
            )

    # ---- helpers -----------------------------------------------------------
    def inject_xid(self, index: int, xid: int) -> None:
        with self._cond:
            self.events.append((index, xid))
            self._cond.notify_all()

    def _gpu(self, handle: FakeHandle, fn: str) -> FakeGpu:
        gpu = self.gpus[handle.index]
        gpu.calls[fn] = gpu.calls.get(fn, 0) + 1
        if gpu.lost:
            raise NVMLError(GPU_IS_LOST)
        if fn in gpu.fail:
            raise NVMLError(gpu.fail[fn])
        if gpu.delay_s.get(fn):
            time.sleep(gpu.delay_s[fn])
        return gpu

    # ---- library -----------------------------------------------------------
    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise NVMLError(self.init_error)
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self.initialised -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        return "580.00.00"

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        if self.gpus[index].lost:
            raise NVMLError(GPU_IS_LOST)
        return FakeHandle(index)

    def nvmlDeviceGetIndex(self, handle: FakeHandle) -> int:
        return handle.index

    def nvmlDeviceGetUUID(self, h: FakeHandle) -> str:
        return self._gpu(h, "nvmlDeviceGetUUID").uuid

    def nvmlDeviceGetName(self, h: FakeHandle) -> str:
        return self._gpu(h, "nvmlDeviceGetName").name

    def nvmlDeviceGetTemperature(self, h: FakeHandle, sensor: int) -> int:
        return self._gpu(h, "nvmlDeviceGetTemperature").temperature

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: FakeHandle) -> int:
        return self._gpu(h, "nvmlDeviceGetCurrentClocksEventReasons").clocks_event_mask

    def nvmlDeviceGetUtilizationRates(self, h: FakeHandle) -> SimpleNamespace:
        g = self._gpu(h, "nvmlDeviceGetUtilizationRates")
        return SimpleNamespace(gpu=g.util_gpu, memory=g.util_memory)

    def nvmlDeviceGetClockInfo(self, h: FakeHandle, kind: int) -> int:
        g = self._gpu(h, "nvmlDeviceGetClockInfo")
        return g.sm_clock_mhz if kind == 1 else g.memory_clock_mhz

    def nvmlDeviceGetMaxClockInfo(self, h: FakeHandle, kind: int) -> int:
        g = self._gpu(h, "nvmlDeviceGetMaxClockInfo")
        return g.sm_clock_max_mhz if kind == 1 else g.memory_clock_max_mhz

    def nvmlDeviceGetPowerUsage(self, h: FakeHandle) -> int:
        return self._gpu(h, "nvmlDeviceGetPowerUsage").power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, h: FakeHandle) -> int:
        return self._gpu(h, "nvmlDeviceGetEnforcedPowerLimit").power_limit_mw

    def nvmlDeviceGetMemoryInfo(self, h: FakeHandle) -> SimpleNamespace:
        g = self._gpu(h, "nvmlDeviceGetMemoryInfo")
        return SimpleNamespace(
            total=g.memory_total, used=g.memory_used, free=g.memory_total - g.memory_used
        )

    def _field(self, g: FakeGpu, fid: int) -> tuple[int, int] | None:
        """(valueType, value) of one field id; None for an id this fake does not know."""
        table = {
            82: (1, g.memory_temperature),
            3: (3, g.ecc_corrected),
            4: (3, g.ecc_uncorrected),
            142: (1, g.remapped[0]),
            143: (1, g.remapped[1]),
            144: (1, g.remapped[2]),
            145: (1, g.remapped[3]),
            94: (1, g.pcie_replay),
            74: (3, g.power_violation_ns),
            75: (3, g.thermal_violation_ns),
            185: (1, g.power_mw),
        }
        return table.get(fid)

    def _field_results(self, g: FakeGpu, ids: list[int]) -> list[tuple[int, int, int, int]]:
        """(nvmlReturn, latencyUsec, valueType, value) of each id, after the driver's
        time (the sum of the fields' ``field_latency_us``)."""
        g.field_calls.append(ids)
        if latency := sum(g.field_latency_us.get(fid, 0) for fid in ids):
            time.sleep(latency * 1e-6)
        out = []
        for fid in ids:
            known = self._field(g, fid)
            vtype, value = known if known is not None else (1, 0)
            ret = g.field_fail.get(fid, 0 if known is not None else NOT_SUPPORTED)
            out.append((ret, g.field_latency_us.get(fid, 0), vtype, value))
        return out

    def nvmlDeviceGetFieldValues(
        self, h: FakeHandle, requested: list[int | tuple[int, int]]
    ) -> list[SimpleNamespace]:
        g = self._gpu(h, "nvmlDeviceGetFieldValues")
        # like pynvml: a field id, or a (field id, scope id) pair
        ids = [r[0] if isinstance(r, tuple) else r for r in requested]
        return [
            SimpleNamespace(
                fieldId=fid,
                nvmlReturn=ret,
                timestamp=0,
                latencyUsec=latency,
                valueType=vtype,
                value=SimpleNamespace(**{_VALUE_MEMBERS[vtype]: value}),
            )
            for fid, (ret, latency, vtype, value) in zip(
                ids, self._field_results(g, ids), strict=True
            )
        ]

    def _c_field_values(self, handle: FakeHandle, count: int, values: int) -> int:
        """The C function behind pynvml's wrapper (``ctypes_fields`` mode): fills the
        caller's ``c_nvmlFieldValue_t`` array in place and returns the call's code."""
        try:
            g = self._gpu(handle, "nvmlDeviceGetFieldValues")
        except NVMLError as exc:
            return int(exc.value)
        self.c_field_arrays.append(values)
        slots = ctypes.cast(values, ctypes.POINTER(pynvml.c_nvmlFieldValue_t))
        ids = [slots[i].fieldId for i in range(count)]
        for i, (ret, latency, vtype, value) in enumerate(self._field_results(g, ids)):
            slot = slots[i]
            slot.nvmlReturn, slot.latencyUsec, slot.valueType = ret, latency, vtype
            setattr(slot.value, _VALUE_MEMBERS[vtype], value)
        return 0

    # legacy one-call-per-counter readers
    def nvmlDeviceGetViolationStatus(self, h: FakeHandle, policy: int) -> SimpleNamespace:
        g = self._gpu(h, "nvmlDeviceGetViolationStatus")
        ns = g.thermal_violation_ns if policy == 1 else g.power_violation_ns
        return SimpleNamespace(referenceTime=0, violationTime=ns)

    def nvmlDeviceGetTotalEccErrors(self, h: FakeHandle, kind: int, counter: int) -> int:
        g = self._gpu(h, "nvmlDeviceGetTotalEccErrors")
        return g.ecc_corrected if kind == 0 else g.ecc_uncorrected

    def nvmlDeviceGetRemappedRows(self, h: FakeHandle) -> tuple[int, int, int, int]:
        return self._gpu(h, "nvmlDeviceGetRemappedRows").remapped

    def nvmlDeviceGetPcieReplayCounter(self, h: FakeHandle) -> int:
        return self._gpu(h, "nvmlDeviceGetPcieReplayCounter").pcie_replay

    def _procs(self, items: list[tuple[int, int | None]]) -> list[SimpleNamespace]:
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in items]

    def nvmlDeviceGetComputeRunningProcesses(self, h: FakeHandle) -> list[SimpleNamespace]:
        return self._procs(self._gpu(h, "nvmlDeviceGetComputeRunningProcesses").compute_processes)

    def nvmlDeviceGetGraphicsRunningProcesses(self, h: FakeHandle) -> list[SimpleNamespace]:
        g = self._gpu(h, "nvmlDeviceGetGraphicsRunningProcesses")
        return self._procs(g.graphics_processes)

    # GPM
    def nvmlGpmQueryDeviceSupport(self, h: FakeHandle) -> SimpleNamespace:
        g = self._gpu(h, "nvmlGpmQueryDeviceSupport")
        return SimpleNamespace(version=1, isSupportedDevice=int(g.gpm_supported))

    def nvmlGpmSampleAlloc(self) -> SimpleNamespace:
        return SimpleNamespace(handle=None)

    def nvmlGpmSampleFree(self, sample: SimpleNamespace) -> None:
        return None

    def nvmlGpmSampleGet(self, h: FakeHandle, sample: SimpleNamespace) -> SimpleNamespace:
        self._gpu(h, "nvmlGpmSampleGet")
        sample.handle = h
        return sample

    def nvmlGpmMetricsGet(self, request: _FakeMetricsGet) -> _FakeMetricsGet:
        g = self._gpu(request.sample2.handle, "nvmlGpmMetricsGet")
        for m in request.metrics[: request.numMetrics]:
            m.nvmlReturn = g.gpm_metric_fail.get(m.metricId, 0)
            m.value = {10: g.gpm_dram_bw_util, 2: g.gpm_sm_util}.get(m.metricId, 0.0)
        return request

    # events
    def nvmlEventSetCreate(self) -> object:
        return object()

    def nvmlDeviceRegisterEvents(self, h: FakeHandle, types: int, event_set: object) -> None:
        self._gpu(h, "nvmlDeviceRegisterEvents")
        if h.index in self.register_fail:
            raise NVMLError(self.register_fail[h.index])
        self.registered.add(h.index)

    def nvmlEventSetWait_v2(self, event_set: object, timeout_ms: int) -> SimpleNamespace:
        with self._cond:
            if not self.events:
                self._cond.wait(timeout_ms / 1000.0)
            if not self.events:
                raise NVMLError(TIMEOUT)
            index, xid = self.events.popleft()
        return SimpleNamespace(
            device=FakeHandle(index), eventType=0x8, eventData=xid, gpuInstanceId=0
        )

    def nvmlEventSetFree(self, event_set: object) -> None:
        self.event_set_freed = True
