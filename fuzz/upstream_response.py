"""Fuzz target: raw bytes from a broken upstream into Sentinel's upstream client
(``sentinel.proxy.rawhttp``) and the chain above it.

Each example is an upstream that answers a request with arbitrary bytes (well-formed
answers bent in every way: 1xx before the answer, bad or duplicated lengths, broken
chunked framing, stray bytes after the answer, resets; or plain noise), cut into
random parts, then closes. Invariants:

- no exception escapes but the chain's own outcomes (``Exhausted``, ``ProxyError``)
  and, mid-body, ``UpstreamError``;
- each request gets exactly one outcome, and every slot is given back;
- the connection is never reused with another answer's bytes: the next request to
  the same upstream gets exactly its own body.

Run by hand (minutes): ``.venv/bin/python -m fuzz.upstream_response --examples 20000``;
the suite runs a bounded number (tests/unit/test_proxy_fuzz.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from sentinel.config.schema import AdmissionConfig, BreakerConfig, TierConfig
from sentinel.proxy.chain import Chain, Exhausted
from sentinel.proxy.errors import ProxyError
from sentinel.proxy.metrics import ProxyMetrics
from sentinel.proxy.rawhttp import RawTransport
from sentinel.proxy.tier import ProxyRequest, build_tier
from sentinel.proxy.upstream import MockResponse, MockTransport, UpstreamError, UpstreamRequest
from sentinel.state import EngineStatus

STATUSES = [100, 102, 103, 200, 201, 204, 206, 304, 400, 404, 429, 500, 502, 503]


@st.composite
def answers(draw: st.DrawFn) -> bytes:
    """One upstream answer: mostly HTTP-shaped, bent; sometimes noise."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=300))
    out = b""
    for _ in range(draw(st.integers(0, 2))):  # interim answers first
        code = draw(st.sampled_from([100, 102, 103]))
        out += b"HTTP/1.1 %d Interim\r\nlink: </a>\r\n\r\n" % code
    status = draw(st.sampled_from(STATUSES))
    body = draw(st.binary(max_size=200))
    headers = [b"HTTP/1.%d %d X" % (draw(st.integers(0, 1)), status)]
    framing = draw(st.sampled_from(["length", "chunked", "close", "bad-length", "two-lengths"]))
    if draw(st.booleans()):
        headers.append(b"content-type: text/event-stream")
    if framing == "length":
        headers.append(b"content-length: %d" % draw(st.sampled_from([len(body), len(body) + 5])))
    elif framing == "bad-length":
        headers.append(b"content-length: " + draw(st.sampled_from([b"-1", b"x", b"1e3", b""])))
    elif framing == "two-lengths":
        headers += [b"content-length: %d" % len(body), b"content-length: %d" % (len(body) + 1)]
    elif framing == "chunked":
        headers.append(b"transfer-encoding: chunked")
        size = draw(st.sampled_from([len(body), len(body) + 3, 0]))
        body = b"%x\r\n%s\r\n" % (size, body) + draw(st.sampled_from([b"0\r\n\r\n", b"", b"zz"]))
    if draw(st.booleans()):
        headers.append(b"connection: close")
    out += b"\r\n".join(headers) + b"\r\n\r\n" + body
    if draw(st.integers(0, 4)) == 0:  # bytes nobody asked for
        out += draw(st.sampled_from([b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nstray", b"x"]))
    return out


@st.composite
def exchanges(draw: st.DrawFn) -> tuple[list[bytes], bool]:
    """The answer cut into parts, and whether the upstream resets (else closes)."""
    raw = draw(answers())
    cuts = sorted(draw(st.lists(st.integers(0, len(raw)), max_size=4)))
    parts = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    return [p for p in parts if p], draw(st.booleans())


class Target:
    """One fuzzing upstream and a chain in front of it, on one event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.parts: list[bytes] = []
        self.reset = False
        self.port = 0
        self.server: asyncio.AbstractServer | None = None
        self.loop.run_until_complete(self._start())

    async def _start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        metrics = ProxyMetrics(CollectorRegistry())
        # the breaker never opens here: every example reaches the fuzzed upstream
        bcfg = BreakerConfig(consecutive_failures=10**9, ratio_min_requests=10**9)
        acfg = AdmissionConfig()
        timeouts = {"connect_s": 1.0, "first_byte_s": 0.5, "total_s": 2.0}
        fuzzed = TierConfig(name="fuzzed", base_url=self.url, timeouts=timeouts)
        backup = TierConfig(name="backup", base_url="http://backup.invalid")
        self.backup = MockTransport(self._backup)
        tiers = [
            build_tier(fuzzed, lambda: self.url, RawTransport(), bcfg, acfg, metrics, None),
            build_tier(
                backup, lambda: "http://backup.invalid", self.backup, bcfg, acfg, metrics, None
            ),
        ]
        self.chain = Chain(tiers, EngineStatus(), acfg, metrics)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @staticmethod
    async def _backup(_req: UpstreamRequest) -> MockResponse:
        return MockResponse(body=b"backup")

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                n = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        n = int(line.split(b":")[1])
                body = await r.readexactly(n) if n else b""
                own = json.loads(body).get("own") if body else None
                if own is not None:  # a clean request: its own answer, keep-alive
                    data = own.encode()
                    w.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(data), data))
                    await w.drain()
                    continue
                for part in self.parts:
                    w.write(part)
                    await w.drain()
                    await asyncio.sleep(0)
                if self.reset:
                    w.transport.abort()
                else:
                    w.close()
                return
        except (
            asyncio.IncompleteReadError,
            ConnectionError,
            ValueError,
            asyncio.LimitOverrunError,
        ):
            w.transport.abort()

    def request(self, payload: dict[str, Any]) -> ProxyRequest:
        body = json.dumps(payload).encode()
        deadline = self.loop.time() + 5.0
        return ProxyRequest("fz", "POST", "/v1/completions", [], body, payload, "m", deadline)

    async def one(self, parts: list[bytes], reset: bool) -> None:
        self.parts, self.reset = parts, reset
        outcomes = 0
        try:
            opened = await self.chain.open(self.request({"model": "m", "prompt": "x"}))
        except (Exhausted, ProxyError):
            outcomes += 1
        else:
            failed = False
            try:
                if opened.rest is not None and len(parts) % 2:
                    async for _ in opened.rest:  # pulled part by part
                        pass
                elif opened.rest is not None:  # piped, as the relay takes a stream
                    sink = _Collect(self.loop)
                    opened.resp.pipe(sink)
                    await sink.done
            except UpstreamError:
                failed = True
            finally:
                opened.finish(failed)
            outcomes += 1
        assert outcomes == 1
        assert [t.in_use() for t in self.chain.tiers] == [0, 0], "a slot was not given back"
        # the next request to the same upstream gets exactly its own answer
        own = f"own-{self.loop.time()}"
        opened = await self.chain.open(self.request({"model": "m", "own": own}))
        opened.finish()
        assert opened.tier.name == "fuzzed", opened.tier.name
        assert opened.first == own.encode(), (opened.first, own)
        assert [t.in_use() for t in self.chain.tiers] == [0, 0]

    def check(self, parts: list[bytes], reset: bool) -> None:
        self.loop.run_until_complete(asyncio.wait_for(self.one(parts, reset), 10))

    def close(self) -> None:
        assert self.server is not None
        self.loop.run_until_complete(self.chain.tiers[0].transport.aclose())
        self.loop.run_until_complete(asyncio.sleep(0.05))  # the handlers see the EOF
        self.server.close()
        self.loop.run_until_complete(self.server.wait_closed())
        self.loop.close()


class _Collect:
    """A ``BodySink`` that keeps the parts and resolves ``done`` at the end."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.done: asyncio.Future[None] = loop.create_future()
        self.parts: list[bytes] = []

    def data(self, data: bytes) -> None:
        assert not self.done.done(), "a part after the end"
        self.parts.append(data)

    def end(self, error: UpstreamError | None) -> None:
        assert not self.done.done(), "two ends"
        if error is None:
            self.done.set_result(None)
        else:
            self.done.set_exception(error)


def fuzz(examples: int) -> None:
    target = Target()
    try:

        @settings(
            max_examples=examples,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            database=None,
        )
        @given(exchanges())
        def run(ex: tuple[list[bytes], bool]) -> None:
            target.check(*ex)

        run()
    finally:
        target.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=5000)
    fuzz(ap.parse_args().examples)
    print("ok")


if __name__ == "__main__":
    main()
