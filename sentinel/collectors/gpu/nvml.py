"""The boundary to NVML: a thin layer over ``pynvml`` (nvidia-ml-py), injectable for tests.

Every read is safe, in the style of gpustat: a field the device does not support
(NotSupported, FunctionNotFound, NoPermission) becomes ``None``, is counted once and
not asked again; another error becomes ``None`` and is counted each time (it may be
transient); GPU-is-lost (or reset-required) marks the whole device lost, and it is
not read again. NVML missing (no library, no driver) raises ``NvmlUnavailable`` once,
at load time.

Cost (measured on an H100 in a VM, driver 580, ``bench/gpu_calls.py``): most calls
take 5-30 us, but the first call of a poll ~40-100 us more, GPM's sample ~200 us when
polls are spaced out (~40 us back to back), the process list 30 us idle and ~150 us
with a process on a busy GPU, and some counters are firmware round trips of 0.4-2 ms
that get 2-3 times slower when the GPU is busy (thermal violation time, PCIe
replays). NVML serializes calls on a device: spreading a poll over threads gains
nothing. So:

- identity and maximum clocks are read once;
- the counters (memory temperature, ECC, remapped rows, PCIe replays, violation
  times, power draw) can each be read through nvmlDeviceGetFieldValues or an older
  one-value call; at open, each way is timed and the cheaper kept. The cheap fields are read
  every poll in ONE field-values call (its cost grows ~1.5 us a field: per-field
  return codes keep each field's safety), prepared once (``fields.FieldValues``: one
  array, the ids set once, then only the C call each poll); a cheap one-value call is
  read every poll on its own;
- the expensive counters (over ``FAST_READ_S`` at open, or 3 polls in a row later,
  judged by the driver's per-field ``latencyUsec`` inside the batch or the call's
  time) and the graphics-process list (none on a compute server) are "slow reads":
  ``refresh_slow()``, which the poll thread calls between polls, reads at most one of
  them, each every ``slow_every`` polls, staggered; polls expose their last values.
  A poll never pays for them: their cost is reported on its own
  (``slow_read_durations_s``). The enforced power limit, a setting, is one of them
  whatever it costs;
- the compute-process list (~150 us on a busy GPU) is read again when the memory
  used changed since the last read (a process came, went, grew or shrank), and at
  least every ``slow_every`` polls.

Utilization comes from GPM (one sample a poll, metrics between the last two), and
from NVML's utilization rates only where GPM is unsupported. PCIe throughput is not
read (NVML samples it over 20 ms on every call).

A poll starts with cold CPU caches after a second asleep (Python runs 4-8 times
slower than back to back), so the hot path touches little: no frozen dataclass
(``sample.py``), pynvml's structures read with ``object.__getattribute__`` (their
Python-level override only turns bytes into str), the process tuple reused while the
lists and roles are unchanged.

Nothing here is thread-aware beyond what NVML itself guarantees (it is thread-safe);
one poll thread owns the ``GpuDevice`` objects.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from sentinel.collectors.gpu.fields import FieldValues, plain_attr, plain_setattr
from sentinel.collectors.gpu.sample import GpuProcess, GpuSample

# NVML return codes (the C ABI; pynvml's NVML_ERROR_* have the same values).
SUCCESS = 0
NOT_SUPPORTED = 3
NO_PERMISSION = 4
TIMEOUT = 10
FUNCTION_NOT_FOUND = 13
GPU_IS_LOST = 15
RESET_REQUIRED = 16
_PERMANENT = {NOT_SUPPORTED, NO_PERMISSION, FUNCTION_NOT_FOUND}
_LOST = {GPU_IS_LOST, RESET_REQUIRED}
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
_MHZ = 1_000_000.0
_NS = 1e-9

# A counter read costing more than this (measured per device at open, or 3 polls in a
# row later) is "slow": it is read by ``refresh_slow()`` between polls, every
# ``slow_every`` polls, at most one slow read each time.
FAST_READ_S = 150e-6
# Polls in a row over FAST_READ_S that make a cheap counter read slow.
DEMOTE_AFTER = 3
_NEVER = object()
# GPM metrics read: (metric id, sample key, its source key, field name if failing)
_GPM_METRICS = (
    (GPM_DRAM_BW_UTIL, "memory_bandwidth_ratio", "memory_bandwidth_source", "gpm_dram_bw_util"),
    (GPM_SM_UTIL, "sm_utilization_ratio", "sm_utilization_source", "gpm_sm_util"),
)
# nvmlValueType_t -> member of the nvmlValue_t union
_VALUE_MEMBER = {
    0: "dVal",
    1: "uiVal",
    2: "ulVal",
    3: "ullVal",
    4: "sllVal",
    5: "siVal",
    6: "usVal",
}


class NvmlUnavailable(Exception):
    """NVML cannot be used here: nvidia-ml-py, the library or the driver is missing."""


class GpuLost(Exception):
    """The device fell off the bus or needs a reset; nothing more can be read from it."""


def code_name(code: int) -> str:
    return _CODE_NAMES.get(code, f"error_{code}")


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


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
            return _text(self.lib.nvmlSystemGetDriverVersion())
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


class GpuDevice:
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
        self._fields_ok = True
        self._planned_fields_ok = True
        self._batch: list[CounterGroup] | None = None  # None: not planned yet
        self._batch_fields: tuple[tuple[str, int], ...] = ()  # the batch's (name, field id)
        self._fast_legacy: list[CounterGroup] = []
        self._over: dict[str, int] = {}  # cheap group -> consecutive polls over FAST_READ_S
        self._slow: list[tuple[CounterGroup, str]] = []
        self._refreshes = 0
        self.field_latency_s: dict[str, float] = {}  # the driver's latencyUsec, last read
        self.field_latency_max_s = 0.0  # the largest of the last field-values call
        self._field_readers: dict[tuple[tuple[str, int], ...], FieldValues] = {}
        self._graphics: list[Any] | None = None  # the last graphics-process list
        self._compute: list[Any] | None = None  # the last compute-process list
        self._compute_read_at: Any = _NEVER  # memory used when it was read
        # (compute list, graphics list, roles, owned, the process tuple built from them)
        self._last_processes: tuple[Any, Any, dict[int, str], set[int], Any] | None = None
        self._polls_since_compute = 0
        self.slow_every = max(1, slow_every)
        self._cache: dict[str, Any] = {}
        self.read_costs: dict[str, dict[str, float]] = {}
        self.counter_plan: dict[str, str] = {}
        self.slow_read_durations_s: dict[str, float] = {}  # slow read -> its last duration

    # ---- safe reads --------------------------------------------------------
    def note_failure(self, field: str, code: int) -> None:
        """Record a failed read of ``field``; raise GpuLost when the device is gone."""
        if code in _LOST:
            raise GpuLost(f"GPU {self.index} ({self.uuid}): {code_name(code)}")
        if code in _PERMANENT:
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
            self.uuid = _text(uuid) if uuid is not None else self.uuid
            self.name = _text(name) if name is not None else self.name
            sm_max = self.read("sm_clock_max", lib.nvmlDeviceGetMaxClockInfo, h, CLOCK_SM)
            mem_max = self.read("memory_clock_max", lib.nvmlDeviceGetMaxClockInfo, h, CLOCK_MEM)
            self.sm_clock_max_hz = sm_max * _MHZ if sm_max is not None else None
            self.memory_clock_max_hz = mem_max * _MHZ if mem_max is not None else None
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
            self.lost = exc.value in _LOST
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
        v["sm_clock_hz"] = sm * _MHZ if sm is not None else None
        v["memory_clock_hz"] = mem * _MHZ if mem is not None else None
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

    # ---- counters: memory temperature, ECC, remapped rows, PCIe replays, violations ----
    def read_fields(self, pairs: tuple[tuple[str, int], ...]) -> dict[str, Any]:
        """Field values in one nvmlDeviceGetFieldValues call: {name: value, or None}.
        The driver's time for each field (``latencyUsec``) lands in ``field_latency_s``,
        the largest of this call's in ``field_latency_max_s``."""
        unsupported = self.unsupported
        if unsupported:
            pairs = tuple(pair for pair in pairs if pair[0] not in unsupported)
        self.field_latency_max_s = 0.0
        if not pairs or not self._fields_ok:
            return {}
        reader = self._field_readers.get(pairs)
        if reader is None:
            if len(self._field_readers) >= 16:  # groups tried at open, then the batch
                self._field_readers.clear()
            reader = self._field_readers[pairs] = FieldValues(
                self.lib, self.handle, [fid for _, fid in pairs]
            )
        try:
            values = reader.read()
        except self.lib.NVMLError as exc:
            if exc.value in _PERMANENT:
                self._fields_ok = False
            self.note_failure("field_values", exc.value)
            return dict.fromkeys(name for name, _ in pairs)
        out: dict[str, Any] = {}
        latencies = self.field_latency_s
        slowest = 0
        get = plain_attr
        for (name, _), fv in zip(pairs, values, strict=False):
            latency = get(fv, "latencyUsec")
            latencies[name] = latency * 1e-6
            if latency > slowest:
                slowest = latency
            ret = get(fv, "nvmlReturn")
            member = _VALUE_MEMBER.get(get(fv, "valueType"))
            if ret != SUCCESS or member is None:
                self.note_failure(name, ret if ret != SUCCESS else 2)
                out[name] = None
            else:
                out[name] = getattr(get(fv, "value"), member)
        self.field_latency_max_s = slowest * 1e-6
        return out

    def _reader(self, group: CounterGroup, how: str) -> Callable[[], dict[str, Any]]:
        if how == "fields":
            return lambda: self.read_fields(group.fields)
        assert group.legacy is not None
        return lambda: group.legacy(self)  # type: ignore[misc]

    def plan_counters(self) -> None:
        """Time each counter group's readers (field values, legacy call) on this device.
        A group is cheap when a reader costs at most FAST_READ_S: field values then
        (read every poll in one batch), else the cheap legacy call (every poll, on its
        own). Other groups are slow reads, the cheaper way. The reads fill the cache."""
        self._batch, self._fast_legacy, self._slow, self._over = [], [], [], {}
        self.read_costs, self.counter_plan = {}, {}
        for group in COUNTER_GROUPS:
            costs: dict[str, float] = {}
            hows = ["fields"] if self._fields_ok and group.fields else []
            hows += ["legacy"] if group.legacy else []
            for how in hows:
                reader, best, got = self._reader(group, how), float("inf"), {}
                # a field the driver lacks may still have its older call (power draw
                # before Ampere): then the legacy try has its own say on support
                undo = how == "fields" and group.legacy is not None
                before = (set(self.unsupported), Counter(self.unsupported_reads)) if undo else None
                for _ in range(3):
                    t0 = time.perf_counter()
                    got = reader()
                    best = min(best, time.perf_counter() - t0)
                self._cache.update(got)
                if any(v is not None for v in got.values()):
                    costs[how] = best
                elif before is not None:
                    self.unsupported, self.unsupported_reads = before
            self.read_costs[group.name] = costs
            if not costs:
                continue  # unsupported on this device (counted)
            cheapest = min(costs, key=costs.__getitem__)
            if group.settled:  # a setting, not a measurement: between polls
                self._demote(group, cheapest)
            elif costs.get("fields", float("inf")) <= FAST_READ_S:
                self._batch.append(group)
                self.counter_plan[group.name] = "fields (one call for all), every poll"
            elif costs.get("legacy", float("inf")) <= FAST_READ_S:
                self._fast_legacy.append(group)
                self.counter_plan[group.name] = "legacy, every poll"
            else:
                self._demote(group, cheapest)
        self._set_batch_fields()
        self._planned_fields_ok = self._fields_ok

    def _set_batch_fields(self) -> None:
        self._batch_fields = tuple(f for group in self._batch or () for f in group.fields)

    def _demote(self, group: CounterGroup, how: str) -> None:
        self._slow.append((group, how))
        self.counter_plan[group.name] = f"{how}, every {self.slow_every} polls, between polls"

    def _over_budget(self, group: CounterGroup, seconds: float) -> bool:
        """Whether a cheap group has now cost over FAST_READ_S DEMOTE_AFTER polls in a
        row (a driver cache that the back-to-back timing at open hit, or a busy GPU)."""
        if seconds <= FAST_READ_S:
            self._over.pop(group.name, None)
            return False
        n = self._over.get(group.name, 0) + 1
        self._over[group.name] = n
        return n >= DEMOTE_AFTER

    def _counters(self) -> dict[str, Any]:
        if self._batch is None or self._planned_fields_ok != self._fields_ok:
            self.plan_counters()
        else:
            if self._batch:
                pairs = self._batch_fields
                self._cache.update(self.read_fields(pairs))
                latency = self.field_latency_s
                if self._over or self.field_latency_max_s > FAST_READ_S:
                    for group in list(self._batch):
                        # the driver's time of the group's fields within the one call
                        cost = max(latency.get(name, 0.0) for name, _ in group.fields)
                        if self._over_budget(group, cost):
                            self._batch.remove(group)
                            self._set_batch_fields()
                            self._demote(group, "fields")
            for group in list(self._fast_legacy):
                t0 = time.perf_counter()
                self._cache.update(self._reader(group, "legacy")())
                if self._over_budget(group, time.perf_counter() - t0):
                    self._fast_legacy.remove(group)
                    self._demote(group, "legacy")
        raw = self._cache
        return {
            key: convert(x)
            for name, key, convert in _COUNTER_KEYS
            if (x := raw.get(name)) is not None
        }

    # ---- between polls -----------------------------------------------------
    def slow_reads(self) -> list[tuple[str, Callable[[], Any]]]:
        """What ``refresh_slow()`` takes turns at: the slow counter groups, then the
        graphics-process list."""
        out: list[tuple[str, Callable[[], Any]]] = [
            (group.name, partial(self._read_group, group, how)) for group, how in self._slow
        ]
        if "graphics_processes" not in self.unsupported:
            out.append(("graphics_processes", self._read_graphics))
        return out

    def _read_group(self, group: CounterGroup, how: str) -> None:
        self._cache.update(self._reader(group, how)())

    def refresh_slow(self) -> tuple[str, float] | None:
        """One slow read, if one is due (each every ``slow_every`` calls, staggered):
        (its name, seconds it took), else None. Meant for the gap between two polls,
        once per poll interval; the next ``sample()`` exposes what it read."""
        if self.lost:
            return None
        reads = self.slow_reads()
        if not reads:
            return None
        step = max(1, self.slow_every // len(reads))
        k, self._refreshes = self._refreshes, self._refreshes + 1
        if k % step:
            return None
        name, fn = reads[(k // step) % len(reads)]
        t0 = time.perf_counter()
        try:
            fn()
        except GpuLost:
            self.lost = True
            return None
        took = time.perf_counter() - t0
        self.slow_read_durations_s[name] = took
        return name, took

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


# ---- counter groups: the same values through field values or one legacy call each ----
_REMAPPED = (
    "remapped_correctable",
    "remapped_uncorrectable",
    "remapped_pending",
    "remapped_failure",
)
_INT_COUNTERS = ("ecc_corrected", "ecc_uncorrected", *_REMAPPED)


def _seconds(ns: int) -> float:
    return ns * _NS


def _watts(mw: int) -> float:
    return mw / 1000.0


# counter value -> (its GpuSample key, the conversion from NVML's unit)
_COUNTER_KEYS: tuple[tuple[str, str, Callable[[Any], Any]], ...] = (
    ("memory_temperature", "memory_temperature_c", float),
    *((name, name, int) for name in _INT_COUNTERS),
    ("pcie_replay", "pcie_replays", int),
    ("thermal_violation", "thermal_violation_s", _seconds),
    ("power_violation", "power_violation_s", _seconds),
    ("power", "power_w", _watts),
    ("power_limit", "power_limit_w", _watts),
)


def _legacy_ecc(d: GpuDevice) -> dict[str, Any]:
    fn = d.lib.nvmlDeviceGetTotalEccErrors  # (type: 0 corrected / 1 uncorrected, 0 volatile)
    return {
        "ecc_corrected": d.read("ecc_corrected", fn, d.handle, 0, 0),
        "ecc_uncorrected": d.read("ecc_uncorrected", fn, d.handle, 1, 0),
    }


def _legacy_remapped(d: GpuDevice) -> dict[str, Any]:
    if any(name in d.unsupported for name in _REMAPPED):
        return {}
    try:
        rows = d.lib.nvmlDeviceGetRemappedRows(d.handle)
    except d.lib.NVMLError as exc:
        for name in _REMAPPED:
            d.note_failure(name, exc.value)
        return dict.fromkeys(_REMAPPED)
    return dict(zip(_REMAPPED, rows, strict=True))


def _legacy_pcie(d: GpuDevice) -> dict[str, Any]:
    return {"pcie_replay": d.read("pcie_replay", d.lib.nvmlDeviceGetPcieReplayCounter, d.handle)}


def _violation(d: GpuDevice, name: str, policy: int) -> dict[str, Any]:
    got = d.read(name, d.lib.nvmlDeviceGetViolationStatus, d.handle, policy)
    return {name: got.violationTime if got is not None else None}


def _legacy_thermal(d: GpuDevice) -> dict[str, Any]:
    return _violation(d, "thermal_violation", PERF_POLICY_THERMAL)


def _legacy_power(d: GpuDevice) -> dict[str, Any]:
    return _violation(d, "power_violation", PERF_POLICY_POWER)


def _legacy_power_draw(d: GpuDevice) -> dict[str, Any]:
    return {"power": d.read("power", d.lib.nvmlDeviceGetPowerUsage, d.handle)}


def _legacy_power_limit(d: GpuDevice) -> dict[str, Any]:
    return {"power_limit": d.read("power_limit", d.lib.nvmlDeviceGetEnforcedPowerLimit, d.handle)}


@dataclass(frozen=True)
class CounterGroup:
    name: str
    fields: tuple[tuple[str, int], ...]  # (value name, NVML field id)
    legacy: Callable[[GpuDevice], dict[str, Any]] | None
    settled: bool = False  # a setting that rarely changes: a slow read whatever it costs


# field ids: NVML_FI_DEV_MEMORY_TEMP 82, _ECC_SBE_VOL_TOTAL 3, _ECC_DBE_VOL_TOTAL 4,
# _REMAPPED_COR/UNC/PENDING/FAILURE 142-145, _PCIE_REPLAY_COUNTER 94,
# _PERF_POLICY_POWER 74 and _THERMAL 75 (violation time, ns, as nvmlDeviceGetViolationStatus),
# _POWER_AVERAGE 185 (mW over 1 s, as nvmlDeviceGetPowerUsage on Ampere and later)
COUNTER_GROUPS = (
    CounterGroup("memory_temperature", (("memory_temperature", 82),), None),
    CounterGroup("ecc", (("ecc_corrected", 3), ("ecc_uncorrected", 4)), _legacy_ecc),
    CounterGroup(
        "remapped_rows",
        tuple(zip(_REMAPPED, (142, 143, 144, 145), strict=True)),
        _legacy_remapped,
    ),
    CounterGroup("pcie_replay", (("pcie_replay", 94),), _legacy_pcie),
    CounterGroup("thermal_violation", (("thermal_violation", 75),), _legacy_thermal),
    CounterGroup("power_violation", (("power_violation", 74),), _legacy_power),
    CounterGroup("power", (("power", 185),), _legacy_power_draw),
    # the enforced limit (no field gives the same value): a setting, read between polls
    CounterGroup("power_limit", (), _legacy_power_limit, settled=True),
)
