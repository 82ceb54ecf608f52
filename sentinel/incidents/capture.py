"""Capture: a py-spy dump of every engine process, in parallel, saved as one incident.

Each incident directory holds ``record.json`` (time, reason, detail, and per process:
role, pid, outcome, seconds, why not, top frames) and one ``<role>-<pid>.txt`` per
dump. Automatic captures are rate-limited (``watchdogs.dump.min_interval_s``);
operator dumps are not. Every dump is counted in ``sentinel_dumps_total``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sentinel.incidents.pyspy import DumpResult, PySpy
from sentinel.incidents.store import IncidentStore, safe_label
from sentinel.logs import get_logger, redact_text
from sentinel.watchdogs.metrics import WatchdogMetrics

log = get_logger("sentinel.incidents")


@dataclass(frozen=True)
class Target:
    pid: int
    role: str


@dataclass
class Capture:
    reason: str
    detail: str
    at: float
    results: list[DumpResult]
    path: Path | None = None
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def record(self) -> dict[str, object]:
        return {
            "reason": self.reason,
            "detail": redact_text(self.detail),
            "at": self.at,
            "at_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.at)),
            "seconds": round(self.seconds, 3),
            "path": str(self.path) if self.path else None,
            "processes": [r.record() for r in self.results],
            "errors": self.errors,
        }


class Capturer:
    def __init__(
        self,
        pyspy: PySpy,
        store: IncidentStore,
        metrics: WatchdogMetrics,
        targets: Callable[[], Sequence[Target]],
        *,
        min_interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pyspy = pyspy
        self.store = store
        self.metrics = metrics
        self.targets = targets
        self.min_interval_s = min_interval_s
        self._clock = clock
        self._last_auto: float | None = None
        self.last: Capture | None = None
        self._lock = asyncio.Lock()

    def rate_limited(self) -> bool:
        last = self._last_auto
        return last is not None and self._clock() - last < self.min_interval_s

    async def capture(
        self,
        reason: str,
        detail: str = "",
        *,
        automatic: bool = True,
        role: str | None = None,
        pid: int | None = None,
        native: bool | None = None,
        save: bool = True,
    ) -> Capture | None:
        """Dump the engine's processes (or those of ``role``, or ``pid``); None when an
        automatic capture is rate-limited."""
        reason = safe_label(reason)
        if automatic and self.rate_limited():
            self.metrics.dumps.labels(reason, "rate_limited").inc()
            log.info(
                "stack dump skipped: rate-limited (watchdogs.dump.min_interval_s)",
                reason=reason,
                detail=detail,
            )
            return None
        if automatic:
            self._last_auto = self._clock()
        async with self._lock:  # one capture at a time: py-spy pauses the processes
            return await self._capture(reason, detail, role, pid, native, save)

    async def _capture(
        self,
        reason: str,
        detail: str,
        role: str | None,
        pid: int | None,
        native: bool | None,
        save: bool,
    ) -> Capture:
        t0 = time.monotonic()
        targets = [
            t
            for t in self.targets()
            if (role is None or t.role == role) and (pid is None or t.pid == pid)
        ]
        cap = Capture(reason, detail, time.time(), [])
        if not targets:
            what = f"pid {pid}" if pid is not None else f"role {role}" if role else "any process"
            cap.errors.append(f"no engine process matches {what}")
        results = await asyncio.gather(
            *(self.pyspy.dump(t.pid, t.role, native=native) for t in targets)
        )
        cap.results = list(results)
        cap.seconds = time.monotonic() - t0
        for res in cap.results:
            self.metrics.dumps.labels(reason, res.outcome).inc()
            if res.ok:
                self.metrics.dump_seconds.labels(res.role).observe(res.seconds)
        if save:
            try:
                cap.path = await asyncio.to_thread(self._save, cap)
            except OSError as exc:
                cap.errors.append(f"cannot save under {self.store.dir}: {exc}")
        self._log(cap)
        self.last = cap
        return cap

    def _save(self, cap: Capture) -> Path:
        path = self.store.new_dir("dump", cap.reason)
        for res in cap.results:
            name = f"{safe_label(res.role)}-{res.pid}.txt"
            body = res.text if res.ok else f"no stack dump: {res.error}\n{res.text}"
            (path / name).write_text(body)
        (path / "record.json").write_text(json.dumps(cap.record(), indent=2, default=str))
        self.store.enforce_budget(keep=path)
        return path

    def _log(self, cap: Capture) -> None:
        for res in cap.results:
            if res.ok:
                log.warning(
                    "stack dump saved",
                    reason=cap.reason,
                    role=res.role,
                    pid=res.pid,
                    seconds=round(res.seconds, 3),
                    note=res.error or None,
                    top_frames=res.top_frames(),
                    path=str(cap.path) if cap.path else None,
                )
            else:
                log.error(
                    "stack dump failed",
                    reason=cap.reason,
                    role=res.role,
                    pid=res.pid,
                    outcome=res.outcome,
                    why=res.error,
                )
        for err in cap.errors:
            log.error("stack dump problem", reason=cap.reason, error=err)
