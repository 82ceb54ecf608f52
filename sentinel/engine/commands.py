"""The supervisor's commands: stop (exit), restart (a new generation), park (a preemption
notice: stop, launch no other) and the evidence hook before a restart for a hang."""

from __future__ import annotations

import asyncio
import signal
import time

from sentinel.engine import diagnose as dx
from sentinel.engine import proctree
from sentinel.engine.generation import Generation, signame
from sentinel.logs import get_logger
from sentinel.state import Lifecycle

log = get_logger("sentinel.engine")

# restarts a person asked for do not count toward the crash-loop limit
OPERATOR_REASONS = frozenset({"sighup", "operator"})
# restarts of an engine presumed hung: no graceful drain, TERM then KILL after kill_grace_s
HUNG_REASONS = frozenset({"stalled", "not_ready", "startup_timeout"})


class CommandsMixin:
    """Mixed into Supervisor; uses its generation handling (_end_generation, ...)."""

    async def _stop(self, sig: int, grace_s: float, drained: bool = False) -> None:
        if self._stop_signal is not None:
            return
        self._stop_signal = sig
        self._launch_at = None
        name = signame(sig)
        log.info("stopping", signal=name, grace_s=grace_s)
        cur = await self._stop_engine(grace_s, f"stopped on {name}")
        if cur is not None:
            code = proctree.exit_code_for_shell(cur.exit_code)
            if drained and cur.exit_code == -signal.SIGKILL and self._stop_requests == 1:
                code = 0  # KILLed on purpose after a drain left nothing to lose: a clean stop
        else:
            code = 1 if self._failed else 0
        log.info(
            "sentinel exiting",
            exit_code=code,
            engine=dx.describe_exit(cur.exit_code) if cur is not None else "not running",
        )
        self._exit_code = code

    async def _restart(self, reason: str, detail: str) -> None:
        if self._stop_signal is not None:
            return
        if self._parked:
            if reason not in OPERATOR_REASONS:
                log.info("engine stopped for a preemption notice; not restarting", reason=reason)
                return
            self._parked = False
        counted = reason not in OPERATOR_REASONS
        log.info("restart requested", reason=reason, detail=detail)
        now = time.monotonic()
        if self._failed:
            if counted:
                log.info("engine is failed; only an operator restart (SIGHUP) revives it")
                return
            self._failed = False
            self._guard.reset()
            self._backoff.reset()
        self.status.record_restart(reason, detail)
        self.status.set_lifecycle(Lifecycle.restarting)
        cur = self._current
        if cur is not None:
            why = f"restart requested: {reason}" + (f" ({detail})" if detail else "")
            hung = reason in HUNG_REASONS
            if hung:
                await self._preserve_evidence(reason, detail)
            grace = self.cfg.kill_grace_s if hung else self.cfg.stop_grace_s
            await self._end_generation(
                cur, grace, forced=("restarted", why), api_server_first=not hung
            )
        if counted and self._guard.tripped(now):
            n = self._guard.starts_in_window(now)
            self._enter_failed(
                f"crash loop: {n} starts within {self.cfg.crash_loop_window_s:g}s; "
                f"last restart requested: {reason} {detail}".strip()
            )
            return
        self._launch_counted = counted
        self._launch_at = time.monotonic()

    async def _park(self, sig: int, grace_s: float) -> None:
        """A preemption notice: stop the engine gracefully, launch no other, stay up."""
        if self._stop_signal is not None or self._parked:
            return
        self._parked = True
        self._launch_at = None
        log.info("stopping the engine for a preemption notice", grace_s=grace_s)
        await self._stop_engine(grace_s, "stopped for a preemption notice")

    async def _stop_engine(self, grace_s: float, why: str) -> Generation | None:
        """Draining -> end the current generation (TERM to the API server first, within
        grace_s; a second stop request cuts the grace) -> kill leftovers -> stopped.
        Returns the generation that was current."""
        self.status.set_lifecycle(Lifecycle.draining)
        cur = self._current
        if cur is not None:
            await self._end_generation(
                cur,
                grace_s,
                forced=("stopped", why),
                escalate=lambda: self._stop_requests > 1,
                api_server_first=True,
            )
        await self._ensure_no_leftovers()
        self.status.set_lifecycle(Lifecycle.stopped)
        return cur

    async def _preserve_evidence(self, reason: str, detail: str) -> None:
        """Await the evidence hook (dumps, snapshot) before a restart for a hang, bounded
        by supervisor.evidence_timeout_s; its failure never blocks the restart."""
        hook = self.before_hang_restart
        if hook is None:
            return
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(hook(reason, detail), self.cfg.evidence_timeout_s)
        except TimeoutError:
            log.warning(
                "preserving evidence took too long; restarting anyway",
                reason=reason,
                limit_s=self.cfg.evidence_timeout_s,
            )
            return
        except Exception as exc:  # noqa: BLE001 - evidence is best effort
            log.error(
                "preserving evidence failed", reason=reason, error=f"{type(exc).__name__}: {exc}"
            )
            return
        log.info(
            "evidence preserved before restart",
            reason=reason,
            seconds=round(time.monotonic() - t0, 3),
        )
