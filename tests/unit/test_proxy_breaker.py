"""Circuit breaker: opens on consecutive failures or a failure ratio, stays open for a
growing time, lets exactly one trial through half-open, closes on success."""

from __future__ import annotations

from sentinel.config.schema import BreakerConfig
from sentinel.proxy.breaker import Breaker, BreakerState


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(**kw: float) -> tuple[Breaker, Clock, list[BreakerState]]:
    clock = Clock()
    changes: list[BreakerState] = []
    cfg = BreakerConfig(
        **{
            "consecutive_failures": 3,
            "open_initial_s": 5.0,
            "open_max_s": 20.0,
            "open_multiplier": 2.0,
            **kw,
        }
    )
    b = Breaker("up", cfg, clock=clock, on_change=lambda _b, s: changes.append(s))
    return b, clock, changes


def test_opens_after_consecutive_failures_only() -> None:
    b, _, _ = make()
    for _ in range(2):
        assert b.allow()
        b.failure()
    assert b.state == BreakerState.closed
    b.success()  # a success resets the streak
    for _ in range(2):
        b.failure()
    assert b.state == BreakerState.closed
    b.failure()
    assert b.state == BreakerState.open
    assert not b.allow()
    assert 4.9 < b.retry_after() <= 5.0


def test_opens_on_failure_ratio_over_window() -> None:
    b, clock, _ = make(
        consecutive_failures=100, failure_ratio=0.5, ratio_window_s=10, ratio_min_requests=10
    )
    for i in range(9):  # alternate: never 100 in a row, ratio ~0.5 but too few requests
        (b.failure if i % 2 == 0 else b.success)()
    assert b.state == BreakerState.closed
    b.failure()  # 10 requests, 6 failed
    assert b.state == BreakerState.open


def test_old_results_leave_the_ratio_window() -> None:
    b, clock, _ = make(
        consecutive_failures=100, failure_ratio=0.5, ratio_window_s=10, ratio_min_requests=4
    )
    b.failure()
    b.failure()
    b.success()
    clock.t += 11  # the two failures age out
    b.success()
    b.failure()
    b.success()
    assert b.state == BreakerState.closed


def test_half_open_single_trial_growing_open_time_then_close() -> None:
    b, clock, changes = make()
    for _ in range(3):
        b.failure()
    assert b.state == BreakerState.open
    clock.t += 4.9
    assert not b.allow()
    clock.t += 0.2
    assert b.allow()  # the trial
    assert b.state == BreakerState.half_open
    assert not b.allow()  # only one trial at a time
    b.failure()  # trial failed: open again, twice as long
    assert b.state == BreakerState.open and b.open_for == 10.0
    clock.t += 9.9
    assert not b.allow()
    clock.t += 0.2
    assert b.allow()
    b.failure()
    assert b.open_for == 20.0
    clock.t += 20.1
    assert b.allow()
    b.failure()
    assert b.open_for == 20.0  # capped at open_max_s
    clock.t += 20.1
    assert b.allow()
    b.success()
    assert b.state == BreakerState.closed
    assert b.open_for == 5.0  # reset for the next time
    assert b.allow() and b.allow()
    assert changes[:3] == [BreakerState.open, BreakerState.half_open, BreakerState.open]
    assert changes[-1] == BreakerState.closed


def test_released_trial_lets_another_through() -> None:
    b, clock, _ = make()
    for _ in range(3):
        b.failure()
    clock.t += 6
    assert b.allow()
    b.release()  # the trial never reached the upstream (e.g. client gone)
    assert b.allow()
