"""The degradation chain through ``MockTransport``: fallback reasons, the breaker's one
outcome per request, the per-tier model allowlist, errors mapped at the seam."""

from __future__ import annotations

import asyncio

import pytest

from sentinel.proxy.breaker import BreakerState
from sentinel.proxy.chain import Exhausted
from sentinel.proxy.upstream import MockResponse, MockTransport, UpstreamError, UpstreamRequest
from tests.unit.chain_kit import make_chain, request, run, tier

SSE = "text/event-stream"


def answering(body: bytes = b'{"ok": true}', status: int = 200) -> MockTransport:
    async def handler(_req: UpstreamRequest) -> MockResponse:
        return MockResponse(status=status, body=body)

    return MockTransport(handler)


def failing(reason: str, upstream_fault: bool = True) -> MockTransport:
    async def handler(_req: UpstreamRequest) -> MockResponse:
        raise UpstreamError(reason, f"mock {reason}", upstream_fault)

    return MockTransport(handler)


def test_falls_back_on_transport_failures_and_5xx_and_counts_each_once() -> None:
    async def main() -> None:
        dead = failing("connect_error")
        five = answering(b'{"error": "x"}', status=503)
        ok = answering(b'{"served": "c"}')
        chain = make_chain(tier("a", dead), tier("b", five), tier("c", ok))
        req = request()
        opened = await chain.open(req)
        opened.finish()
        assert opened.tier.name == "c" and opened.first == b'{"served": "c"}'
        assert req.hops == [("a", "connect_error"), ("b", "status_5xx")]
        a, b, c = chain.tiers
        assert (a.breaker.consecutive, b.breaker.consecutive, c.breaker.consecutive) == (1, 1, 0)
        assert [t.in_use() for t in chain.tiers] == [0, 0, 0]

    run(main())


def test_a_stream_that_breaks_after_commit_counts_once_as_a_failure() -> None:
    """A committed stream is one outcome for its breaker: a failure when it breaks
    later (it counted as a success and a failure), a success when it ends well."""

    async def main() -> None:
        broken = MockTransport(
            lambda _r: _resp(
                MockResponse(
                    parts=[b"data: 1\n\n", b"data: 2\n\n"],
                    error=UpstreamError("reset", "mid-stream"),
                    content_type=SSE,
                )
            )
        )
        chain = make_chain(tier("a", broken), breaker={"consecutive_failures": 1})
        a = chain.tiers[0]
        opened = await chain.open(request(stream=True))
        assert opened.first == b"data: 1\n\n" and not opened.complete
        with pytest.raises(UpstreamError):
            async for _ in opened.rest:
                pass
        opened.finish(upstream_failed=True)
        assert a.breaker.consecutive == 1
        assert a.breaker.recorded == 1  # one outcome recorded, not two
        assert a.breaker.state is BreakerState.open  # 1 failure opens it here: no success

        good = MockTransport(
            lambda _r: _resp(MockResponse(parts=[b"data: 1\n\n", b"data: 2\n\n"], content_type=SSE))
        )
        chain = make_chain(tier("a", good))
        opened = await chain.open(request(stream=True))
        assert chain.tiers[0].breaker.recorded == 0  # nothing counted before the end
        async for _ in opened.rest:
            pass
        opened.finish()
        assert chain.tiers[0].breaker.recorded == 1

    run(main())


async def _resp(r: MockResponse) -> MockResponse:
    return r


def test_a_model_missing_from_a_tiers_map_is_not_sent_to_it() -> None:
    async def main() -> None:
        external = answering(b'{"served": "external"}')
        backup = answering(b'{"served": "backup"}')
        chain = make_chain(
            tier("external", external, model_map={"tiny": "gpt-x"}),
            tier("backup", backup, model_map={"tiny": "tiny", "other": "other"}),
        )
        req = request(model="other")
        opened = await chain.open(req)
        opened.finish()
        assert opened.tier.name == "backup"
        assert req.hops == [("external", "model_not_offered")]
        assert external.requests == []  # the external key was never spent on it
        req = request(model="tiny")
        (await chain.open(req)).finish()
        assert b'"model": "gpt-x"' in external.requests[0].body  # mapped for that tier
        # a model no tier offers: a 404 naming the model, and no upstream request
        req = request(model="secret-model")
        with pytest.raises(Exhausted) as ex:
            await chain.open(req)
        assert ex.value.error is not None and ex.value.error.status == 404
        assert ex.value.error.code == "model_not_found" and "secret-model" in ex.value.error.message
        assert len(external.requests) == 1 and len(backup.requests) == 1
        # without a model (GET /v1/models) every tier is offered the request
        opened = await chain.open(request(model=None))
        opened.finish()
        assert opened.tier.name == "external"

    run(main())


def test_a_body_whose_model_cannot_be_read_is_not_sent_to_a_mapped_tier() -> None:
    """A multipart upload names its model where Sentinel does not read it: a tier with
    a model map (a paid key) is not offered it; a tier without one still is."""

    def multipart(model: str) -> bytes:
        return (
            b'--B\r\ncontent-disposition: form-data; name="model"\r\n\r\n'
            + model.encode()
            + b'\r\n--B\r\ncontent-disposition: form-data; name="file"; filename="a.wav"'
            b"\r\n\r\nRIFF\r\n--B--\r\n"
        )

    async def main() -> None:
        paid = answering(b'{"served": "paid"}')
        chain = make_chain(tier("paid", paid, model_map={"small": "gpt-4o-mini"}))
        req = request(model=None)
        req.target = "/v1/audio/transcriptions"
        req.payload = None
        req.body = multipart("whisper-large-expensive")
        with pytest.raises(Exhausted) as ex:
            await chain.open(req)
        assert ex.value.error is not None and ex.value.error.status == 404
        assert ex.value.error.code == "model_not_found"
        assert "cannot be read" in ex.value.error.message
        assert req.hops == [("paid", "model_unreadable")]
        assert paid.requests == []  # the paid key was never spent on it
        # a tier without a model map still serves it; GET without a body still works
        free = answering(b'{"served": "free"}')
        chain = make_chain(tier("paid", paid, model_map={"small": "x"}), tier("free", free))
        req.hops.clear()
        opened = await chain.open(req)
        opened.finish()
        assert opened.tier.name == "free" and req.hops == [("paid", "model_unreadable")]
        get = request(model=None)
        get.method, get.body, get.payload = "GET", b"", None
        opened = await chain.open(get)
        opened.finish()
        assert opened.tier.name == "paid" and paid.requests[0].method == "GET"

    run(main())


def test_a_whole_body_slower_than_first_byte_s_is_due_by_the_total_deadline() -> None:
    """The head is the first byte of a whole answer: a body that takes longer than
    first_byte_s to arrive is served, not a first_byte_timeout that opens the breaker;
    one past total_s is a total_timeout, counted once, and the next tier serves."""

    def slow_whole(delay: float) -> MockTransport:
        async def handler(_req: UpstreamRequest) -> MockResponse:
            return MockResponse(body=b"a" * 4000, part_delay_s=delay)  # head now, body later

        return MockTransport(handler)

    async def main() -> None:
        timeouts = {"first_byte_s": 0.05, "total_s": 5.0}
        chain = make_chain(tier("slow", slow_whole(0.2), timeouts=timeouts))
        (slow,) = chain.tiers
        for _ in range(4):  # more than the breaker's failure threshold
            req = request()
            opened = await chain.open(req)
            opened.finish()
            assert opened.complete and opened.first == b"a" * 4000 and req.hops == []
        assert slow.breaker.consecutive == 0 and slow.breaker.state is BreakerState.closed
        ok = answering(b'{"served": "backup"}')
        timeouts = {"first_byte_s": 0.05, "total_s": 0.15}
        chain = make_chain(tier("slow", slow_whole(0.5), timeouts=timeouts), tier("b", ok))
        req = request()
        opened = await chain.open(req)
        opened.finish()
        assert opened.tier.name == "b" and req.hops == [("slow", "total_timeout")]
        assert chain.tiers[0].breaker.consecutive == 1 and chain.tiers[0].in_use() == 0

    run(main())


def test_a_bug_of_ours_is_not_an_upstream_failure() -> None:
    """``UpstreamError(upstream_fault=False)`` (our own parser callback raised) moves on
    to the next tier but does not count against the healthy upstream's breaker; an
    exception raised in our code is not turned into an upstream failure at all."""

    async def main() -> None:
        ours = failing("internal_error", upstream_fault=False)
        chain = make_chain(tier("a", ours), tier("b", answering()))
        req = request()
        (await chain.open(req)).finish()
        assert req.hops == [("a", "internal_error")]
        assert chain.tiers[0].breaker.consecutive == 0

        async def raises(_req: UpstreamRequest) -> MockResponse:
            raise KeyError("bug")

        chain = make_chain(tier("a", MockTransport(raises)), tier("b", answering()))
        with pytest.raises(KeyError):
            await chain.open(request())
        assert chain.tiers[0].breaker.consecutive == 0 and chain.tiers[0].in_use() == 0

    run(main())


def test_a_client_gone_while_waiting_aborts_the_upstream_request() -> None:
    async def main() -> None:
        slow_resp = MockResponse(parts=[b"data: 1\n\n"], part_delay_s=5, content_type=SSE)

        async def slow(_req: UpstreamRequest) -> MockResponse:
            return slow_resp

        chain = make_chain(tier("a", MockTransport(slow)))
        opening = asyncio.ensure_future(chain.open(request(stream=True)))
        await asyncio.sleep(0.05)
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening
        await asyncio.sleep(0)
        assert chain.tiers[0].in_use() == 0
        assert chain.tiers[0].breaker.consecutive == 0
        assert slow_resp.aborted  # the upstream hears of it (its connection is closed)

    run(main())


def test_a_half_open_trial_stream_closes_the_breaker_with_its_first_bytes() -> None:
    """A trial that is a long stream does not keep the tier half-open (every other
    request passed over) until it ends: its first bytes close the breaker."""

    async def main() -> None:
        fail = [True]

        async def handler(_req: UpstreamRequest) -> MockResponse:
            if fail[0]:
                raise UpstreamError("connect_error", "down")
            return MockResponse(parts=[b"data: 1\n\n", b"data: 2\n\n"], content_type=SSE)

        breaker = {"consecutive_failures": 1, "open_initial_s": 0.05}
        chain = make_chain(
            tier("a", MockTransport(handler)), tier("b", answering()), breaker=breaker
        )
        a = chain.tiers[0]
        (await chain.open(request())).finish()
        assert a.breaker.state is BreakerState.open
        await asyncio.sleep(0.06)
        fail[0] = False
        opened = await chain.open(request(stream=True))
        assert opened.tier is a and a.breaker.state is BreakerState.closed
        async for _ in opened.rest:
            pass
        opened.finish()
        assert a.breaker.state is BreakerState.closed and a.breaker.consecutive == 0

    run(main())
