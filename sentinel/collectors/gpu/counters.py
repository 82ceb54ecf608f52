"""The counters of a GPU (memory temperature, ECC, remapped rows, PCIe replays, violation
times, power): the same values through nvmlDeviceGetFieldValues or one older call each.
At open each way is timed and the cheaper kept; cheap field values are read every poll in
one call, a cheap one-value call on its own, and the expensive ones ("slow reads")
between polls, one at a time (``refresh_slow``). A cheap read that costs too much
``DEMOTE_AFTER`` polls in a row becomes a slow one."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from sentinel.collectors.gpu.fields import FieldValues, plain_attr
from sentinel.collectors.gpu.nvml_codes import (
    NS,
    PERF_POLICY_POWER,
    PERF_POLICY_THERMAL,
    PERMANENT,
    SUCCESS,
    GpuLost,
)

if TYPE_CHECKING:
    from sentinel.collectors.gpu.device import GpuDevice

# A counter read costing more than this (measured per device at open, or 3 polls in a
# row later) is "slow": it is read by ``refresh_slow()`` between polls, every
# ``slow_every`` polls, at most one slow read each time.
FAST_READ_S = 150e-6
# Polls in a row over FAST_READ_S that make a cheap counter read slow.
DEMOTE_AFTER = 3
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


class CounterReads:
    """The counter reads of ``device.GpuDevice`` (its base class): planning them at
    open, reading them every poll, and the slow reads between polls."""

    # given by GpuDevice
    lib: Any
    handle: Any
    lost: bool
    slow_every: int
    unsupported: set[str]
    unsupported_reads: Counter[str]
    read: Callable[..., Any]
    note_failure: Callable[[str, int], None]
    _read_graphics: Callable[[], None]

    def init_counters(self) -> None:
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
        self._cache: dict[str, Any] = {}
        self.read_costs: dict[str, dict[str, float]] = {}
        self.counter_plan: dict[str, str] = {}
        self.slow_read_durations_s: dict[str, float] = {}  # slow read -> its last duration

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
            if exc.value in PERMANENT:
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


# ---- counter groups: the same values through field values or one legacy call each ----
_REMAPPED = (
    "remapped_correctable",
    "remapped_uncorrectable",
    "remapped_pending",
    "remapped_failure",
)
_INT_COUNTERS = ("ecc_corrected", "ecc_uncorrected", *_REMAPPED)


def _seconds(ns: int) -> float:
    return ns * NS


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
