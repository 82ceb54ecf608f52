"""Restart pacing: exponential backoff with jitter, and the crash-loop guard."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable

from sentinel.config.schema import SupervisorConfig


class Backoff:
    """Delay before restart attempt n (1-based): initial * multiplier**(n-1), capped,
    then spread by +/- jitter (a fraction), never above the cap nor below zero."""

    def __init__(
        self,
        initial_s: float,
        max_s: float,
        multiplier: float,
        jitter: float,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.initial_s, self.max_s = initial_s, max_s
        self.multiplier, self.jitter = multiplier, jitter
        self._rng = rng
        self.attempt = 0

    @classmethod
    def from_config(cls, cfg: SupervisorConfig, rng: Callable[[], float] = random.random):
        return cls(
            cfg.backoff_initial_s,
            cfg.backoff_max_s,
            cfg.backoff_multiplier,
            cfg.backoff_jitter,
            rng,
        )

    def base_delay(self, attempt: int) -> float:
        exp = min(max(attempt - 1, 0), 1000)
        try:
            raw = self.initial_s * self.multiplier**exp
        except OverflowError:
            raw = self.max_s
        return min(raw, self.max_s)

    def next_delay(self) -> float:
        """Advance the attempt counter and return the delay to wait before it."""
        self.attempt += 1
        base = self.base_delay(self.attempt)
        spread = base * self.jitter * (2 * self._rng() - 1)
        return max(0.0, min(self.max_s, base + spread))

    def reset(self) -> None:
        self.attempt = 0


class CrashLoopGuard:
    """Counts engine starts; ``max_starts`` starts within ``window_s`` is a crash loop."""

    def __init__(self, max_starts: int, window_s: float) -> None:
        self.max_starts, self.window_s = max_starts, window_s
        self._starts: deque[float] = deque()

    def _trim(self, now: float) -> None:
        while self._starts and now - self._starts[0] > self.window_s:
            self._starts.popleft()

    def record_start(self, now: float) -> None:
        self._starts.append(now)
        self._trim(now)

    def starts_in_window(self, now: float) -> int:
        self._trim(now)
        return len(self._starts)

    def tripped(self, now: float) -> bool:
        """True when another start would exceed the limit."""
        return self.starts_in_window(now) >= self.max_starts

    def reset(self) -> None:
        self._starts.clear()
