"""Ending an engine generation (TERM, grace, KILL; drain its output; explain and record
its exit), and what follows an unexpected end: back off and restart, or ``failed`` on a
crash loop."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from sentinel.config.schema import OnFailed
from sentinel.engine import diagnose as dx
from sentinel.engine import proctree
from sentinel.engine.commands import HUNG_REASONS
from sentinel.engine.generation import Generation, roles
from sentinel.logs import get_logger
from sentinel.state import ExitInfo, Lifecycle

log = get_logger("sentinel.engine")

READER_DRAIN_S = 1.0
EXIT_TAIL_LINES = 50
LOGGED_TAIL_LINES = 20


class EndingMixin:
    """Mixed into Supervisor; uses its cfg, life, status, _tail, _ctx, _backoff, _guard,
    _current and the reaping, pruning and GPU clean-up helpers."""

    async def _end_generation(
        self,
        gen: Generation,
        grace_s: float,
        forced: tuple[str, str] | None = None,
        escalate: Callable[[], bool] = lambda: False,
        api_server_first: bool = False,
    ) -> ExitInfo:
        """Terminate everything of ``gen`` (TERM, grace, KILL), drain its output,
        explain and record its exit. ``api_server_first``: TERM the API server alone and
        the rest once it has exited (a graceful stop)."""
        gen.ending = True
        leader_was_alive = not gen.leader_reaped
        if gen.load_task is not None:
            gen.load_task.cancel()
        report = await proctree.terminate(
            lambda: self._members(gen),
            grace_s,
            self._reap,
            escalate=escalate,
            kill_wait_s=self.life.unkillable_after_s,
            first=(lambda m: m.pid == gen.pid) if api_server_first else None,
        )
        self._gpu_suspects.update(report.termed + report.killed)
        others = {p for p in report.termed + report.killed if p != gen.pid}
        self.status.orphans_killed += len(others)
        if report.termed or report.killed:
            log.info(
                "engine generation terminated",
                generation=gen.number,
                termed=report.termed,
                killed=report.killed,
                seconds=round(report.seconds, 3),
                api_server_was_alive=leader_was_alive,
            )
        if report.survivors:
            self._mark_unkillable(gen.number, report.survivors, roles(gen))
        for _ in range(50):  # the API server is dead; its status arrives with the reap
            if gen.leader_reaped:
                break
            await asyncio.sleep(0.02)
            self._reap()
        await self._drain_readers(gen)
        tail = self._tail.lines(gen.number, last=EXIT_TAIL_LINES)
        code = gen.exit_code
        if forced is not None:
            reason, cause = forced
        else:
            d = dx.diagnose(code, tail, self._ctx, gen.loaded)
            reason, cause = d.reason, d.cause
        info = self._record_exit(gen.number, gen.pid, code, reason, cause, tail)
        if self._current is gen:
            self._current = None
        self._prune()
        await self._gpu_cleanup()
        return info

    def _record_exit(
        self, number: int, pid: int, code: int | None, reason: str, cause: str, tail: list[str]
    ) -> ExitInfo:
        info = ExitInfo(
            generation=number,
            pid=pid,
            returncode=code if code is not None and code >= 0 else None,
            signal=-code if code is not None and code < 0 else None,
            at=time.time(),
            cause=cause,
            reason=reason,
            log_tail=tail,
        )
        self.status.record_exit(info)
        expected = reason in ("stopped", "restarted")
        (log.info if expected else log.error)(
            "engine exited",
            generation=number,
            reason=reason,
            cause=cause,
            status=dx.describe_exit(code) if pid else "not started",
            log_tail=tail[-LOGGED_TAIL_LINES:] if not expected else None,
        )
        return info

    async def _drain_readers(self, gen: Generation) -> None:
        pending = [t for t in gen.readers if not t.done()]
        if pending:
            _, still = await asyncio.wait(pending, timeout=READER_DRAIN_S)
            for task in still:
                task.cancel()
            for task in still:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _generation_failed(
        self, gen: Generation, restart_reason: str, forced: tuple[str, str] | None = None
    ) -> None:
        self.status.set_lifecycle(Lifecycle.restarting)
        if restart_reason in HUNG_REASONS and forced is not None:
            await self._preserve_evidence(restart_reason, forced[1])
        info = await self._end_generation(gen, self.cfg.kill_grace_s, forced)
        await self._after_failure(restart_reason, info.cause)

    async def _after_failure(self, restart_reason: str, cause: str) -> None:
        """After an unexpected end or a failed launch: back off and restart, or give up."""
        if self._stop_signal is not None:
            return
        now = time.monotonic()
        if self._guard.tripped(now):
            n = self._guard.starts_in_window(now)
            why = (
                f"crash loop: {n} starts within {self.cfg.crash_loop_window_s:g}s "
                f"(supervisor.crash_loop_max_starts); last failure: {cause}"
            )
            self._enter_failed(why)
            return
        delay = self._backoff.next_delay()
        self.status.record_restart(restart_reason, cause)
        self.status.set_lifecycle(Lifecycle.restarting)
        self._launch_at = now + delay
        log.warning(
            "engine restarting",
            reason=restart_reason,
            in_s=round(delay, 2),
            attempt=self._backoff.attempt,
            starts_in_window=self._guard.starts_in_window(now),
        )

    def _enter_failed(self, why: str) -> None:
        self._failed = True
        self._launch_at = None
        self.status.set_lifecycle(Lifecycle.failed, why)
        log.error(
            "engine failed",
            state="failed",
            reason=why,
            on_failed=self.cfg.on_failed.value,
            log_tail=self._tail.lines(last=LOGGED_TAIL_LINES),
        )
        if self.cfg.on_failed == OnFailed.exit:
            self._exit_code = 1
