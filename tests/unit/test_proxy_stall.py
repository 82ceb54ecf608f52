"""A stall of Sentinel's own event loop is never blamed on the upstream: when a
connect or first-byte deadline passes while the loop was blocked, what the socket
already holds counts (a connection the kernel completed, a head that arrived in time).
Run on asyncio's loop and on uvloop (production's), whose timers run before it
polls the sockets."""

from __future__ import annotations

import asyncio
import time

import pytest

from sentinel.proxy.breaker import BreakerState
from sentinel.proxy.rawhttp import RawTransport
from sentinel.proxy.upstream import MockResponse, MockTransport, UpstreamRequest
from tests.fake_openai import FakeOpenAI
from tests.unit.chain_kit import LOOPS, make_chain, request, run, tier

STALL_S = 1.5
TIMEOUTS = {"connect_s": 0.5, "first_byte_s": 1.0, "total_s": 30}


async def backup_answer(_req: UpstreamRequest) -> MockResponse:
    return MockResponse(body=b'{"served_by": "backup"}')


def stall(fake: FakeOpenAI, n: int) -> None:
    """Block this (Sentinel's) event loop for ``STALL_S``, and on until the fake has
    answered its ``n`` th request: the answer is in the socket before the loop runs again,
    however slowly this machine lets the fake answer."""
    time.sleep(STALL_S)
    until = time.monotonic() + 20
    while (len(fake.requests) < n or fake.active) and time.monotonic() < until:
        time.sleep(0.01)
    time.sleep(0.05)  # its write, after its handler returned


async def wait_requests(fake: FakeOpenAI, n: int) -> None:
    """Until the fake has received ``n`` requests (it answers from its own thread)."""
    for _ in range(5000):
        if len(fake.requests) >= n:
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"the fake received {len(fake.requests)} requests, not {n}")


@pytest.mark.parametrize("loop", LOOPS)
def test_a_connect_completed_during_a_stall_is_used(a: FakeOpenAI, loop: str) -> None:
    async def main() -> None:
        t = RawTransport()
        req = UpstreamRequest("GET", a.url, "/v1/models", [], b"", 0.5)
        sending = asyncio.ensure_future(t.send(req))
        await asyncio.sleep(0)  # the connect is under way
        time.sleep(STALL_S)  # Sentinel's loop blocked past the connect deadline
        resp = await sending
        assert resp.status == 200 and b"fake-model" in await resp.read()
        await t.aclose()

    run(main(), loop)


@pytest.mark.parametrize("pooled", [True, False], ids=["pooled", "fresh"])
@pytest.mark.parametrize("loop", LOOPS)
def test_a_stall_past_the_first_byte_deadline_is_no_upstream_failure(
    a: FakeOpenAI, loop: str, pooled: bool
) -> None:
    """The upstream answers in 0.2 s; the loop is blocked 1.5 s (first_byte_s: 1 s):
    no fallback, no breaker failure."""
    a.mode["delay"] = 0.2
    backup = MockTransport(backup_answer)

    async def main() -> None:
        chain = make_chain(
            tier("a", RawTransport(), base_url=a.url, timeouts=TIMEOUTS),
            tier("backup", backup),
        )
        local = chain.tiers[0]
        if pooled:  # one exchange first: its connection waits in the pool
            opened = await chain.open(request(rid="warm"))
            opened.finish()
        n = len(a.requests)
        req = request(rid="stalled")
        opening = asyncio.ensure_future(chain.open(req))
        if pooled:
            await wait_requests(a, n + 1)  # the request is out
            stall(a, n + 1)  # meanwhile the upstream answers
        else:
            await asyncio.sleep(0)  # its first-byte clock runs, its connect is to come
            time.sleep(STALL_S)
        opened = await opening
        opened.finish()
        assert opened.tier.name == "a" and b"served_by" in opened.first
        assert req.hops == []
        assert backup.requests == []
        assert local.breaker.consecutive == 0 and local.breaker.state is BreakerState.closed
        assert local.in_use() == 0
        await local.transport.aclose()

    run(main(), loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_an_upstream_that_is_really_late_still_times_out(a: FakeOpenAI, loop: str) -> None:
    """The grace is for what arrived in time, not for a slow upstream."""
    a.mode["delay"] = 5.0  # far past the 1 s deadline, however busy this machine is
    backup = MockTransport(backup_answer)

    async def main() -> None:
        chain = make_chain(
            tier("a", RawTransport(), base_url=a.url, timeouts=TIMEOUTS), tier("backup", backup)
        )
        req = request()
        opened = await chain.open(req)
        opened.finish()
        assert opened.tier.name == "backup"
        assert req.hops == [("a", "first_byte_timeout")]
        assert chain.tiers[0].breaker.consecutive == 1
        await chain.tiers[0].transport.aclose()

    run(main(), loop)
