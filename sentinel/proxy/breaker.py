"""A circuit breaker per upstream.

closed --(N consecutive failures, or failure ratio >= R over the window with at least
M requests)--> open --(open period elapsed)--> half_open: exactly one trial request
is let through; its success closes the breaker (and resets the open period), its
failure re-opens it for ``open_multiplier`` times longer, capped at ``open_max_s``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from enum import IntEnum

from sentinel.config.schema import BreakerConfig


class BreakerState(IntEnum):
    closed = 0
    half_open = 1
    open = 2


Listener = Callable[["Breaker", BreakerState], None]


class Breaker:
    def __init__(
        self,
        name: str,
        cfg: BreakerConfig,
        clock: Callable[[], float] = time.monotonic,
        on_change: Listener | None = None,
    ) -> None:
        self.name = name
        self.cfg = cfg
        self._clock = clock
        self._on_change = on_change
        self.state = BreakerState.closed
        self.consecutive = 0
        self.open_for = cfg.open_initial_s  # length of the current/next open period
        self.opened_at = 0.0
        self.opens = 0
        self._trial_out = False
        self._window: deque[tuple[float, bool]] = deque()  # (at, failed)
        self._window_failures = 0

    # ---- asking --------------------------------------------------------------
    def allow(self) -> bool:
        """May a request go to this upstream now? In half-open, True once (the trial)."""
        if self.state == BreakerState.closed:
            return True
        if self.state == BreakerState.open:
            if self._clock() - self.opened_at < self.open_for:
                return False
            self._set(BreakerState.half_open)
        if self._trial_out:
            return False
        self._trial_out = True
        return True

    def retry_after(self) -> float:
        if self.state != BreakerState.open:
            return 0.0
        return max(0.0, self.opened_at + self.open_for - self._clock())

    @property
    def recorded(self) -> int:
        """Outcomes (successes and failures) in the ratio window."""
        return len(self._window)

    # ---- outcomes ------------------------------------------------------------
    def success(self) -> None:
        self.consecutive = 0
        self._record(False)
        if self.state == BreakerState.half_open:
            self._trial_out = False
            self.open_for = self.cfg.open_initial_s
            self._window.clear()
            self._window_failures = 0
            self._set(BreakerState.closed)

    def failure(self) -> None:
        self.consecutive += 1
        self._record(True)
        if self.state == BreakerState.half_open:
            self._trial_out = False
            self.open_for = min(self.open_for * self.cfg.open_multiplier, self.cfg.open_max_s)
            self._open()
        elif self.state == BreakerState.closed and self._should_open():
            self.open_for = self.cfg.open_initial_s
            self._open()

    def release(self) -> None:
        """The request allowed through never reached the upstream (no outcome)."""
        if self.state == BreakerState.half_open:
            self._trial_out = False

    # ---- internals -------------------------------------------------------------
    def _record(self, failed: bool) -> None:
        now = self._clock()
        w = self._window
        w.append((now, failed))
        self._window_failures += failed
        horizon = now - self.cfg.ratio_window_s
        while w and w[0][0] < horizon:
            self._window_failures -= w.popleft()[1]

    def _should_open(self) -> bool:
        if self.consecutive >= self.cfg.consecutive_failures:
            return True
        n = len(self._window)
        return n >= self.cfg.ratio_min_requests and (
            self._window_failures / n >= self.cfg.failure_ratio
        )

    def _open(self) -> None:
        self.opened_at = self._clock()
        self.opens += 1
        self._set(BreakerState.open)

    def _set(self, state: BreakerState) -> None:
        if state != self.state:
            self.state = state
            if self._on_change is not None:
                self._on_change(self, state)
