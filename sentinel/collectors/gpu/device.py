"""One GPU over NVML: identity and maxima once, then ``sample()`` every poll (temperature,
clocks, memory, utilization from GPM or NVML's rates, the counters, the processes) and
``refresh_slow()`` between polls. Every read is safe: see ``GpuDevice.read``. The counter
planning (field values or one-value calls, cheap or slow) is ``counters.CounterReads``."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from typing import Any

from sentinel.collectors.gpu.counters import CounterReads
from sentinel.collectors.gpu.fields import plain_attr, plain_setattr
from sentinel.collectors.gpu.nvml_codes import (
    CLOCK_MEM,
    CLOCK_SM,
    GPM_DRAM_BW_UTIL,
    GPM_SM_UTIL,
    LOST,
    MHZ,
    PERMANENT,
    SUCCESS,
    TEMPERATURE_GPU,
    GpuLost,
    code_name,
    text,
)
from sentinel.collectors.gpu.sample import GpuProcess, GpuSample

_NEVER = object()
# GPM metrics read: (metric id, sample key, its source key, field name if failing)
_GPM_METRICS = (
    (GPM_DRAM_BW_UTIL, "memory_bandwidth_ratio", "memory_bandwidth_source", "gpm_dram_bw_util"),
    (GPM_SM_UTIL, "sm_utilization_ratio", "sm_utilization_source", "gpm_sm_util"),
)


class _Gpm:
    """GPM (Hopper+): DRAM bandwidth and SM utilization between the last two samples."""

    METRICS = tuple(metric for metric, *_ in _GPM_METRICS)

    def __init__(self, lib: Any, handle: Any) -> None:
        self.lib = lib
        self.handle = handle
        self.samples = [lib.nvmlGpmSampleAlloc(), lib.nvmlGpmSampleAlloc()]
        self.current = 0
        self.have_previous = False
        request = lib.c_nvmlGpmMetricsGet_t()
        request.version = lib.NVML_GPM_METRICS_GET_VERSION
        request.numMetrics = len(self.METRICS)
        for i, metric in enumerate(self.METRICS):
            request.metrics[i].metricId = metric
        self.request = request

    def read(self) -> list[tuple[int, float]] | None:
        """Take a sample; return [(nvml return code, value)] in METRICS order once two
        samples exist."""
        new = self.samples[self.current]
        self.lib.nvmlGpmSampleGet(self.handle, new)
        old = self.samples[self.current ^ 1]
        self.current ^= 1
        if not self.have_previous:
            self.have_previous = True
            return None
        request, get = self.request, plain_attr  # pynvml structures: see fields.py
        plain_setattr(request, "sample1", old)
        plain_setattr(request, "sample2", new)
        self.lib.nvmlGpmMetricsGet(request)
        metrics = get(request, "metrics")
        return [
            (int(get(m, "nvmlReturn")), float(get(m, "value")))
            for m in metrics[: len(self.METRICS)]
        ]

    def close(self) -> None:
        for sample in self.samples:
            try:
                self.lib.nvmlGpmSampleFree(sample)
            except self.lib.NVMLError:
                pass


class GpuDevice(CounterReads):
    """One GPU: identity and maxima read once, then ``sample()`` every poll and
    ``refresh_slow()`` between polls."""

    def __init__(self, lib: Any, index: int, slow_every: int = 1) -> None:
        self.lib = lib
        self.index = index
        self.handle: Any = None
        self.uuid = f"unknown-{index}"
        self.name = "unknown"
        self.lost = False
        self.unsupported: set[str] = set()
        self.unsupported_reads: Counter[str] = Counter()
        self.read_errors: Counter[tuple[str, str]] = Counter()
        self.xid_counts: Counter[int] = Counter()
        self.sm_clock_max_hz: float | None = None
        self.memory_clock_max_hz: float | None = None
        self._gpm: _Gpm | None = None
        self._reasons_fn: Callable[[Any], int] | None = None
        self._graphics: list[Any] | None = None  # the last graphics-process list
        self._compute: list[Any] | None = None  # the last compute-process list
        self._compute_read_at: Any = _NEVER  # memory used when it was read
        # (compute list, graphics list, roles, owned, the process tuple built from them)
        self._last_processes: tuple[Any, Any, dict[int, str], set[int], Any] | None = None
        self._polls_since_compute = 0
        self.slow_every = max(1, slow_every)
        self.init_counters()

    # ---- safe reads --------------------------------------------------------
    def note_failure(self, field: str, code: int) -> None:
        """Record a failed read of ``field``; raise GpuLost when the device is gone."""
        if code in LOST:
            raise GpuLost(f"GPU {self.index} ({self.uuid}): {code_name(code)}")
        if code in PERMANENT:
            self.unsupported.add(field)
            self.unsupported_reads[field] += 1
        else:
            self.read_errors[(field, code_name(code))] += 1

    def read(self, field: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, or None when the field is unsupported or the read failed."""
        if field in self.unsupported:
            return None
        try:
            return fn(*args)
        except self.lib.NVMLError as exc:
            self.note_failure(field, exc.value)
            return None

    # ---- once --------------------------------------------------------------
    def open(self) -> None:
        lib = self.lib
        try:
            self.handle = lib.nvmlDeviceGetHandleByIndex(self.index)
            h = self.handle
            uuid = self.read("uuid", lib.nvmlDeviceGetUUID, h)
            name = self.read("name", lib.nvmlDeviceGetName, h)
            self.uuid = text(uuid) if uuid is not None else self.uuid
            self.name = text(name) if name is not None else self.name
            sm_max = self.read("sm_clock_max", lib.nvmlDeviceGetMaxClockInfo, h, CLOCK_SM)
            mem_max = self.read("memory_clock_max", lib.nvmlDeviceGetMaxClockInfo, h, CLOCK_MEM)
            self.sm_clock_max_hz = sm_max * MHZ if sm_max is not None else None
            self.memory_clock_max_hz = mem_max * MHZ if mem_max is not None else None
            self._reasons_fn = getattr(lib, "nvmlDeviceGetCurrentClocksEventReasons", None) or (
                lib.nvmlDeviceGetCurrentClocksThrottleReasons
            )
            support = self.read("gpm", lib.nvmlGpmQueryDeviceSupport, h)
            if support is not None and support.isSupportedDevice:
                self._gpm = self.read("gpm", _Gpm, lib, h)
            elif support is not None:
                self.unsupported.add("gpm")
                self.unsupported_reads["gpm"] += 1
            self.plan_counters()
            self._read_graphics()
        except lib.NVMLError as exc:  # the handle itself
            self.lost = exc.value in LOST
            if not self.lost:
                self.note_failure("handle", exc.value)
                self.lost = True  # no handle: nothing can be read
        except GpuLost:
            self.lost = True

    def close(self) -> None:
        if self._gpm is not None:
            self._gpm.close()
            self._gpm = None

    # ---- every poll --------------------------------------------------------
    def sample(
        self, roles: Mapping[int, str] | None = None, owned: Collection[int] = ()
    ) -> GpuSample:
        """Read everything but the slow reads once (those: ``refresh_slow()``).
        ``roles`` maps engine pids to their role; ``owned`` holds other pids Sentinel
        started (their role is ``other``)."""
        start = time.perf_counter()
        values: dict[str, Any] = {}
        if not self.lost:
            try:
                values = self._read_all(roles or {}, owned)
            except GpuLost:
                self.lost = True
                values = {}
        return GpuSample(
            index=self.index,
            uuid=self.uuid,
            name=self.name,
            lost=self.lost,
            sm_clock_max_hz=self.sm_clock_max_hz,
            memory_clock_max_hz=self.memory_clock_max_hz,
            xid_counts=dict(self.xid_counts),
            unsupported_reads=dict(self.unsupported_reads),
            read_errors=dict(self.read_errors),
            poll_duration_s=time.perf_counter() - start,
            slow_read_durations_s=dict(self.slow_read_durations_s),
            **values,
        )

    def _read_all(self, roles: Mapping[int, str], owned: Collection[int]) -> dict[str, Any]:
        lib, h, read = self.lib, self.handle, self.read
        v: dict[str, Any] = {}
        v["temperature_c"] = read("temperature", lib.nvmlDeviceGetTemperature, h, TEMPERATURE_GPU)
        if self._reasons_fn is not None:
            v["clocks_event_mask"] = read("clocks_event_reasons", self._reasons_fn, h)
        sm = read("sm_clock", lib.nvmlDeviceGetClockInfo, h, CLOCK_SM)
        mem = read("memory_clock", lib.nvmlDeviceGetClockInfo, h, CLOCK_MEM)
        v["sm_clock_hz"] = sm * MHZ if sm is not None else None
        v["memory_clock_hz"] = mem * MHZ if mem is not None else None
        meminfo = read("memory", lib.nvmlDeviceGetMemoryInfo, h)
        used = None
        if meminfo is not None:  # a pynvml structure: see fields.py
            used = v["memory_used_bytes"] = int(plain_attr(meminfo, "used"))
            v["memory_total_bytes"] = int(plain_attr(meminfo, "total"))
        v.update(self._utilization())
        v.update(self._counters())
        self._polls_since_compute += 1
        if (
            self._compute_read_at is _NEVER
            or used is None
            or used != self._compute_read_at
            or self._polls_since_compute >= self.slow_every
        ):
            self._read_compute()
            self._compute_read_at = used
        v["processes"] = self._process_list(roles, owned)
        return v

    def _utilization(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self._gpm is not None and "gpm" not in self.unsupported:
            metrics = self.read("gpm", self._gpm.read)
            if metrics is None:  # first sample (or failed read): nothing to report yet
                return out
            for (ret, value), (_, ratio, source, name) in zip(metrics, _GPM_METRICS, strict=True):
                if ret == SUCCESS:
                    out[ratio] = value / 100.0
                    out[source] = "gpm"
                else:
                    self.note_failure(name, ret)
            if len(out) == 4:
                return out
        rates = self.read("utilization", self.lib.nvmlDeviceGetUtilizationRates, self.handle)
        if rates is not None:
            if "memory_bandwidth_ratio" not in out:
                out["memory_bandwidth_ratio"] = rates.memory / 100.0
                out["memory_bandwidth_source"] = "nvml"
            if "sm_utilization_ratio" not in out:
                out["sm_utilization_ratio"] = rates.gpu / 100.0
                out["sm_utilization_source"] = "nvml"
        return out

    # ---- processes ---------------------------------------------------------
    def _read_graphics(self) -> None:
        procs = self.read(
            "graphics_processes", self.lib.nvmlDeviceGetGraphicsRunningProcesses, self.handle
        )
        self._graphics = list(procs) if procs is not None else None

    def _read_compute(self) -> None:
        procs = self.read(
            "compute_processes", self.lib.nvmlDeviceGetComputeRunningProcesses, self.handle
        )
        self._compute = list(procs) if procs is not None else None
        self._polls_since_compute = 0

    def processes(
        self, roles: Mapping[int, str], owned: Collection[int]
    ) -> tuple[GpuProcess, ...] | None:
        """Every process on the GPU, both lists read now."""
        self._read_graphics()
        self._read_compute()
        return self._process_list(roles, owned)

    def _process_list(
        self, roles: Mapping[int, str], owned: Collection[int]
    ) -> tuple[GpuProcess, ...] | None:
        """The processes of the last compute and graphics reads, with today's roles
        (the last poll's tuple again when neither the lists nor the roles changed)."""
        compute, graphics = self._compute, self._graphics
        last = self._last_processes
        if (
            last is not None
            and last[0] is compute
            and last[1] is graphics
            and last[2] == roles
            and last[3] == owned
        ):
            return last[4]
        procs = self._build_process_list(roles, owned)
        self._last_processes = (compute, graphics, dict(roles), set(owned), procs)
        return procs

    def _build_process_list(
        self, roles: Mapping[int, str], owned: Collection[int]
    ) -> tuple[GpuProcess, ...] | None:
        compute = self._compute
        if compute is None and self._graphics is None:
            return None
        used: dict[int, int] = {}
        for p in (*(compute or ()), *(self._graphics or ())):
            used[int(p.pid)] = max(used.get(int(p.pid), 0), int(p.usedGpuMemory or 0))
        return tuple(
            GpuProcess(
                pid=pid,
                used_bytes=nbytes,
                role=roles.get(pid, "other" if pid in owned else None),
            )
            for pid, nbytes in sorted(used.items())
        )
