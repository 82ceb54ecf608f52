"""Admission control: limit, FIFO queue with timeout, queue bound, no slot leaks."""

from __future__ import annotations

import asyncio

from sentinel.proxy.admission import Admission, Refusal


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_limit_queue_and_timeout() -> None:
    async def main() -> None:
        adm = Admission(limit=2, max_queue=1, queue_timeout_s=0.2)
        assert await adm.acquire() is None
        assert await adm.acquire() is None
        waiter = asyncio.create_task(adm.acquire())
        await asyncio.sleep(0.01)
        assert adm.queued == 1
        assert await adm.acquire() == Refusal.queue_full  # queue bound
        adm.release()  # the slot goes straight to the waiter
        assert await waiter is None
        assert adm.in_flight == 2 and adm.queued == 0
        t0 = asyncio.get_running_loop().time()
        assert await adm.acquire() == Refusal.queue_timeout
        assert 0.15 < asyncio.get_running_loop().time() - t0 < 1.0
        adm.release()
        adm.release()
        assert adm.in_flight == 0

    run(main())


def test_cancelled_waiter_does_not_leak_a_slot() -> None:
    async def main() -> None:
        adm = Admission(limit=1, max_queue=10, queue_timeout_s=5)
        assert await adm.acquire() is None
        w1 = asyncio.create_task(adm.acquire())
        w2 = asyncio.create_task(adm.acquire())
        await asyncio.sleep(0.01)
        adm.release()  # handed to w1 ...
        w1.cancel()  # ... which is cancelled before it runs: the slot passes on to w2
        assert await w2 is None
        assert adm.in_flight == 1
        adm.release()
        assert adm.in_flight == 0 and adm.queued == 0

    run(main())


def test_deadline_shortens_the_wait() -> None:
    async def main() -> None:
        adm = Admission(limit=1, max_queue=10, queue_timeout_s=5)
        await adm.acquire()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await adm.acquire(deadline=t0 + 0.1) == Refusal.queue_timeout
        assert loop.time() - t0 < 1.0

    run(main())
