"""Admission control: a concurrency limit with a bounded FIFO wait queue.

``acquire`` takes a slot at once when one is free, else waits in the queue up to
its timeout; ``release`` hands the slot straight to the oldest waiter. A waiter that
is cancelled after being handed a slot gives it back, so slots never leak.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from enum import StrEnum


class Refusal(StrEnum):
    queue_full = "queue_full"
    queue_timeout = "queue_timeout"


class Admission:
    def __init__(self, limit: int, max_queue: int, queue_timeout_s: float) -> None:
        self.limit = limit
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[bool]] = deque()
        self.last_wait_s = 0.0

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def try_acquire(self) -> bool:
        if self.in_flight < self.limit and not self._waiters:
            self.in_flight += 1
            return True
        return False

    async def acquire(self, deadline: float | None = None) -> Refusal | None:
        """None once a slot is held; else why not. ``deadline`` is a loop.time() bound."""
        if self.try_acquire():
            self.last_wait_s = 0.0
            return None
        if len(self._waiters) >= self.max_queue or self.queue_timeout_s <= 0:
            return Refusal.queue_full
        loop = asyncio.get_running_loop()
        timeout = self.queue_timeout_s
        if deadline is not None:
            timeout = min(timeout, deadline - loop.time())
        fut: asyncio.Future[bool] = loop.create_future()
        self._waiters.append(fut)
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(max(timeout, 0.0)):
                await fut
        except TimeoutError:
            if fut.done() and not fut.cancelled():
                return None  # handed a slot as the timeout fired: keep it
            return Refusal.queue_timeout
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # handed a slot just as we were cancelled: pass it on
            raise
        finally:
            self.last_wait_s = time.monotonic() - t0
            if not fut.done():
                fut.cancel()
            try:
                self._waiters.remove(fut)
            except ValueError:
                pass
        return None

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(True)  # the slot passes to this waiter; in_flight unchanged
                return
        self.in_flight -= 1
