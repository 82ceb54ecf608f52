"""Restart pacing: exponential backoff with jitter, and the crash-loop window."""

from __future__ import annotations

import pytest

from sentinel.config.schema import SupervisorConfig
from sentinel.engine.backoff import Backoff, CrashLoopGuard


def test_backoff_grows_exponentially_and_caps() -> None:
    b = Backoff(1.0, 10.0, 2.0, 0.0)
    assert [b.next_delay() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_backoff_reset_starts_over() -> None:
    b = Backoff(0.5, 60.0, 3.0, 0.0)
    b.next_delay(), b.next_delay()
    b.reset()
    assert b.next_delay() == 0.5


@pytest.mark.parametrize("rng_value", [0.0, 0.5, 0.999999])
def test_jitter_stays_within_fraction_and_cap(rng_value: float) -> None:
    b = Backoff(4.0, 5.0, 2.0, 0.25, rng=lambda: rng_value)
    first = b.next_delay()
    assert 3.0 <= first <= 5.0
    second = b.next_delay()  # base 8 capped to 5; jitter never lifts it above the cap
    assert 3.75 <= second <= 5.0


def test_jitter_spreads_delays() -> None:
    import random

    rng = random.Random(7)
    delays = set()
    for _ in range(20):
        b = Backoff(10.0, 100.0, 2.0, 0.2, rng=rng.random)
        delays.add(round(b.next_delay(), 6))
    assert len(delays) > 10
    assert all(8.0 <= d <= 12.0 for d in delays)


def test_huge_attempt_counts_do_not_overflow() -> None:
    b = Backoff(1.0, 30.0, 10.0, 0.0)
    assert b.base_delay(5000) == 30.0


def test_from_config() -> None:
    cfg = SupervisorConfig(
        backoff_initial_s=2, backoff_max_s=7, backoff_multiplier=3, backoff_jitter=0
    )
    b = Backoff.from_config(cfg)
    assert [b.next_delay() for _ in range(3)] == [2.0, 6.0, 7.0]


def test_crash_loop_trips_at_max_starts_within_window() -> None:
    g = CrashLoopGuard(max_starts=3, window_s=10.0)
    g.record_start(0.0)
    g.record_start(1.0)
    assert not g.tripped(2.0)
    g.record_start(2.0)
    assert g.tripped(2.5)
    assert g.starts_in_window(2.5) == 3


def test_crash_loop_forgets_starts_outside_window() -> None:
    g = CrashLoopGuard(max_starts=3, window_s=10.0)
    for t in (0.0, 1.0, 2.0):
        g.record_start(t)
    assert g.tripped(9.0)
    assert not g.tripped(10.5)  # the start at t=0 has left the window
    assert g.starts_in_window(11.5) == 1


def test_crash_loop_reset() -> None:
    g = CrashLoopGuard(max_starts=1, window_s=100.0)
    g.record_start(0.0)
    assert g.tripped(1.0)
    g.reset()
    assert not g.tripped(1.0)
