"""Engine processes that survive SIGKILL (D state): mark them, recheck them, hold launches
until they are gone; and the last-resort SIGKILL of everything when run() leaves."""

from __future__ import annotations

import signal
import time

from sentinel.engine import proctree
from sentinel.logs import get_logger

log = get_logger("sentinel.engine")


class UnkillableMixin:
    """Mixed into Supervisor; uses its status, _gens, _current and _launch_at."""

    def _mark_unkillable(self, number: int, pids: list[int], roles: dict[int, str]) -> None:
        known = {p["pid"] for p in self.status.unkillable}
        procs = list(self.status.unkillable)
        for pid in pids:
            if pid in known:
                continue
            info = {
                **proctree.describe_stuck(pid),
                "role": roles.get(pid, "other"),
                "generation": number,
                "since": time.time(),
            }
            procs.append(info)
            log.error(
                "engine process survives SIGKILL: state unkillable; no restart until it "
                "is gone (the node may need replacing)",
                pid=pid,
                role=info["role"],
                generation=number,
                proc_state=info["state"],
                state_name=info["state_name"],
                wchan=info["wchan"],
            )
        self.status.set_unkillable(procs)

    def _recheck_unkillable(self) -> None:
        left = []
        for info in self.status.unkillable:
            now = proctree.describe_stuck(int(info["pid"]))
            if now["state"] not in ("gone", "Z"):
                left.append({**info, "state": now["state"], "wchan": now["wchan"]})
        if len(left) != len(self.status.unkillable):
            gone = {p["pid"] for p in self.status.unkillable} - {p["pid"] for p in left}
            log.warning("unkillable engine processes are gone", pids=sorted(gone), left=len(left))
            self.status.set_unkillable(left)
            if not left and self._launch_at is None and self._current is None:
                self._launch_at = time.monotonic()

    def _kill_everything_now(self) -> None:
        """run() is leaving (normally everything is gone already): SIGKILL what is left."""
        for gen in self._gens:
            for pid in list(gen.pidfds):
                self._unwatch(gen, pid)
            for member in self._members(gen):
                proctree.signal_member(member, signal.SIGKILL)
                log.warning("killed on exit", pid=member.pid, generation=gen.number)
            for task in gen.readers:
                task.cancel()
            if gen.load_task is not None:
                gen.load_task.cancel()
        self._reap()
