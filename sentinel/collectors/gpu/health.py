"""GPU thresholds -> the engine's ``degraded`` reason (source ``gpu``).

Degraded is information for routing and alerts (/status, /readyz JSON, metrics); it
is never a reason to restart. Checked after every poll, in the poll thread;
``EngineStatus.set_degraded``/``clear_degraded`` take the status lock, and are only
called when the reason changes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection

from sentinel.collectors.gpu.sample import GpuSnapshot
from sentinel.config.schema import GpuDegradedConfig
from sentinel.state import EngineStatus

SOURCE = "gpu"


class GpuHealth:
    def __init__(
        self,
        cfg: GpuDegradedConfig,
        status: EngineStatus,
        gpu_indices: Collection[int] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.status = status
        self.gpu_indices = set(gpu_indices)  # empty: every GPU counts
        self.clock = clock
        self._xid_seen: dict[int, dict[int, int]] = {}
        self._xid_until: dict[int, tuple[float, str]] = {}
        self._reason: str | None = None

    def reasons(self, snapshot: GpuSnapshot) -> list[str]:
        """Why the engine's GPUs are degraded right now (empty: they are not)."""
        if not snapshot.available:
            return []
        now = self.clock()
        out: list[str] = []
        for dev in snapshot.devices:
            if self.gpu_indices and dev.index not in self.gpu_indices:
                continue
            tag = f"gpu {dev.index}"
            if dev.lost:
                out.append(f"{tag} lost (fell off the bus or needs a reset)")
                continue
            t = dev.temperature_c
            if t is not None and t >= self.cfg.temperature_c:
                out.append(f"{tag} temperature {t:g} C >= {self.cfg.temperature_c:g} C")
            throttled = [r for r in dev.reasons if r in self.cfg.throttle_reasons]
            if throttled:
                out.append(f"{tag} clocks slowed by {'+'.join(throttled)}")
            xid = self._new_xids(dev.index, dev.xid_counts, now)
            if xid:
                out.append(xid)
        return out

    def _new_xids(self, index: int, counts: dict[int, int], now: float) -> str | None:
        seen = self._xid_seen.get(index, {})
        new = {x: n - seen.get(x, 0) for x, n in counts.items() if n > seen.get(x, 0)}
        self._xid_seen[index] = dict(counts)
        if new and self.cfg.on_xid:
            detail = ", ".join(f"XID {x} x{n}" for x, n in sorted(new.items()))
            # stays degraded for xid_hold_s after the last XID (at least one poll)
            self._xid_until[index] = (now + self.cfg.xid_hold_s, f"gpu {index} {detail}")
            return f"gpu {index} {detail}"
        held = self._xid_until.get(index)
        if held and now < held[0]:
            return held[1]
        self._xid_until.pop(index, None)
        return None

    def apply(self, snapshot: GpuSnapshot) -> str | None:
        """Evaluate and set/clear the ``gpu`` degraded reason; return it (None: clear)."""
        reasons = self.reasons(snapshot)
        reason = "; ".join(reasons) if reasons else None
        if reason != self._reason:
            if reason is None:
                self.status.clear_degraded(SOURCE)
            else:
                self.status.set_degraded(SOURCE, reason)
            self._reason = reason
        return reason
