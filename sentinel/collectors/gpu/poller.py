"""The GPU poll thread: reads every GPU at ``gpu.poll_interval_s``, never on the event loop.

Each poll builds an immutable ``GpuSnapshot`` and swaps it in (one attribute store);
the collector and the CLI only read the latest. Halfway between two polls the thread
makes the slow reads that are due (``GpuDevice.refresh_slow``: expensive counters,
graphics processes; at most one per GPU), so that no poll pays for them; the next
poll exposes their values. Between polls the thread waits on
NVML's XID event set (in slices of at most 0.25 s, so ``stop()`` is prompt), so
every XID is counted the moment it happens, whatever the poll interval.

Without NVML (no library, no driver, no GPU) the snapshot says ``available=False``
with the reason, one line is logged (info; warning with ``gpu.mode: on``), and the
thread ends: nothing else changes.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Collection, Iterable

from sentinel.collectors.gpu.health import GpuHealth
from sentinel.collectors.gpu.nvml import (
    GpuDevice,
    GpuLost,
    Nvml,
    NvmlUnavailable,
    XidEvents,
    load_nvml,
)
from sentinel.collectors.gpu.sample import GpuSnapshot
from sentinel.config.schema import GpuConfig, GpuMode
from sentinel.logs import get_logger
from sentinel.state import EngineStatus

log = get_logger(__name__)

_WAIT_SLICE_S = 0.25


class GpuPoller:
    """Owns the NVML session and the poll thread. Not a singleton: the app builds one."""

    def __init__(
        self,
        cfg: GpuConfig,
        status: EngineStatus | None = None,
        owned_pids: Callable[[], Iterable[int]] | None = None,
        *,
        gpu_indices: Collection[int] = (),
        load: Callable[[], Nvml] = load_nvml,
    ) -> None:
        self.cfg = cfg
        self.status = status
        self.owned_pids = owned_pids
        self._load = load
        self.health = GpuHealth(cfg.degraded, status, gpu_indices) if status else None
        self.snapshot = GpuSnapshot(available=False, reason="not started")
        self.nvml: Nvml | None = None
        self.devices: list[GpuDevice] = []
        self.xid: XidEvents | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._logged_lost: set[int] = set()

    # ---- lifecycle ---------------------------------------------------------
    def open(self) -> bool:
        """Initialise NVML and the devices (blocking; in the thread, or from tests and
        the bench). Return whether any GPU can be read."""
        if self.cfg.mode == GpuMode.off:
            self.snapshot = GpuSnapshot(available=False, reason="gpu.mode is off")
            return False
        try:
            nvml = self._load()
            slow_every = round(self.cfg.slow_counters_interval_s / self.cfg.poll_interval_s)
            devices = nvml.open_devices(slow_every=max(1, slow_every))
        except NvmlUnavailable as exc:
            return self._unavailable(str(exc))
        if not devices:
            nvml.close()
            return self._unavailable("NVML found no GPU")
        self.nvml, self.devices = nvml, devices
        self.xid = nvml.xid_events(devices)
        self.snapshot = GpuSnapshot(
            available=True, devices=(), driver_version=nvml.driver_version()
        )
        log.info(
            "gpu telemetry started",
            gpus=[f"{d.index}:{d.name}" for d in devices],
            xid_events=self.xid is not None,
            poll_interval_s=self.cfg.poll_interval_s,
        )
        return True

    def _unavailable(self, reason: str) -> bool:
        self.snapshot = GpuSnapshot(available=False, reason=reason)
        emit = log.warning if self.cfg.mode == GpuMode.on else log.info
        emit("gpu telemetry unavailable: sentinel_gpu_available is 0", reason=reason)
        return False

    def start(self) -> None:
        """Start the poll thread (it opens NVML itself, off the caller's thread)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="sentinel-gpu-poller", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.close()

    def close(self) -> None:
        if self.xid is not None:
            self.xid.close()
            self.xid = None
        for device in self.devices:
            device.close()
        if self.nvml is not None:
            self.nvml.close()
            self.nvml = None

    async def run(self) -> None:
        """For the app's task list: start the thread, stop it when cancelled."""
        self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.to_thread(self.stop)

    # ---- polling -----------------------------------------------------------
    def poll_once(self) -> GpuSnapshot:
        """Read every GPU once, publish the snapshot, apply the health thresholds."""
        if self.nvml is None:
            return self.snapshot
        roles: dict[int, str] = {}
        if self.status is not None:
            roles = {p.pid: p.role for p in list(self.status.processes)}
        owned = set(self.owned_pids()) if self.owned_pids is not None else set()
        samples = tuple(device.sample(roles, owned) for device in self.devices)
        for s in samples:
            if s.lost and s.index not in self._logged_lost:
                self._logged_lost.add(s.index)
                log.warning("gpu lost: no more reads from it", gpu=s.index, uuid=s.uuid)
        snapshot = GpuSnapshot(
            available=True,
            at=time.time(),
            devices=samples,
            driver_version=self.snapshot.driver_version,
        )
        self.snapshot = snapshot
        if self.health is not None:
            self.health.apply(snapshot)
        return snapshot

    def refresh_slow(self) -> dict[int, tuple[str, float]]:
        """The slow reads due now, at most one per GPU: {gpu index: (read, seconds)}."""
        done: dict[int, tuple[str, float]] = {}
        for device in self.devices:
            if (got := device.refresh_slow()) is not None:
                done[device.index] = got
        return done

    def wait_events(self, timeout_s: float) -> None:
        """Count XID events for up to ``timeout_s`` (or just wait, without an event set)."""
        deadline = time.monotonic() + timeout_s
        while not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            got = self.xid.wait(min(remaining, _WAIT_SLICE_S)) if self.xid else None
            if got is None:
                self._stop.wait(min(remaining, _WAIT_SLICE_S))

    def _run(self) -> None:
        if not self.open():
            return
        interval = self.cfg.poll_interval_s
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.poll_once()
            next_at += interval
            now = time.monotonic()
            if next_at < now:  # a slow poll: skip the missed ticks, keep the cadence
                next_at = now + interval
            self.wait_events((next_at - now) / 2)
            if self._stop.is_set():
                break
            self.refresh_slow()
            self.wait_events(next_at - time.monotonic())

    # ---- for the supervisor ------------------------------------------------
    def gpu_processes(self) -> list[tuple[int, int, int]]:
        """(pid, gpu index, used bytes) of every GPU process at the last poll (no NVML
        call; at most one poll interval old)."""
        return [
            (p.pid, dev.index, p.used_bytes)
            for dev in self.snapshot.devices
            for p in dev.processes or ()
        ]


def gpu_processes(load: Callable[[], Nvml] = load_nvml) -> list[tuple[int, int, int]]:
    """(pid, gpu index, used bytes) of every process holding GPU memory, read from NVML
    now. Blocking (tens of ms with NVML's start-up): call it off the event loop
    (``asyncio.to_thread``). Empty without NVML or a GPU."""
    try:
        nvml = load()
    except NvmlUnavailable:
        return []
    out: list[tuple[int, int, int]] = []
    try:
        for index in range(nvml.device_count()):
            device = GpuDevice(nvml.lib, index)
            try:
                device.handle = nvml.lib.nvmlDeviceGetHandleByIndex(index)
                procs = device.processes({}, ())
            except nvml.lib.NVMLError:
                continue
            except GpuLost:
                continue
            out.extend((p.pid, index, p.used_bytes) for p in procs or ())
    except nvml.lib.NVMLError:
        pass
    finally:
        nvml.close()
    return out
