"""Fuzz target: raw bytes into the traffic port's request path (``sentinel.http1``
and ``ProxyHandler``, validation, chain and relay included), with a mock upstream.

    .venv/bin/python -m fuzz.request_path [--examples 20000] [--seed N]

Each case is a list of byte chunks (well-formed requests, broken ones, random bytes,
cut at random points) fed to one connection as successive reads, the event loop
running between them. Checked after each case:

- no exception escapes (a bug of ours would show as a 500 ``internal_error`` answer
  or a logged crash; both fail the case);
- every request handed to the handler gets exactly one answer, plus at most one
  refusal by the connection itself (none after an answer that ends the connection);
- nothing stays in flight (the handler's count and every tier's slots return to 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from sentinel.config.schema import PayloadLogConfig, ProxyConfig
from sentinel.http1.connection import HttpConnection
from sentinel.http1.limits import HttpLimits
from sentinel.proxy.service import ProxyService
from sentinel.proxy.upstream import MockResponse, UpstreamRequest
from sentinel.state import EngineStatus

LIMITS = HttpLimits(
    max_request_line_bytes=512,
    max_header_bytes=2048,
    max_headers=16,
    max_body_bytes=8192,
    header_timeout_s=60,
    body_timeout_s=60,
    keepalive_timeout_s=60,
    max_connections=8,
)


# ---- a mock upstream -------------------------------------------------------------------
def mock_response(request: UpstreamRequest) -> MockResponse:
    """A whole JSON answer, or (``"stream": true``) a stream of three events and [DONE]."""
    try:
        payload = json.loads(request.body) if request.body else {}
    except ValueError:
        payload = {}
    if isinstance(payload, dict) and payload.get("stream") is True:
        parts = [b'data: {"n": %d}\n\n' % i for i in range(3)] + [b"data: [DONE]\n\n"]
        return MockResponse(parts=parts, content_type="text/event-stream")
    return MockResponse(body=b'{"id": "x", "choices": [{"text": "ok"}]}')


class MockTransport:
    async def send(self, request: UpstreamRequest) -> MockResponse:
        await asyncio.sleep(0)
        return mock_response(request)

    async def aclose(self) -> None:
        pass


# ---- a fake client socket ---------------------------------------------------------------
class FakeSocket:
    """The server side's transport: records what the server writes."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False
        self.reading = True

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.out += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class _Server:
    """What a connection needs of its server."""

    def __init__(self, handler: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.handler = handler
        self.limits = LIMITS
        self.loop = loop
        self.connections: set[HttpConnection] = set()
        self.events = self
        self.refusals = 0
        self.what = "proxy"

    def connection_refused(self, reason: str) -> None:
        pass

    def client_refused(self, reason: str) -> None:
        if reason != "idle_timeout":
            self.refusals += 1

    def new_request_id(self) -> str:
        return "refused"


class Target:
    def __init__(self, tmp: Path) -> None:
        self.loop = asyncio.new_event_loop()
        cfg = ProxyConfig(
            host="127.0.0.1",
            port=0,
            max_body_bytes=LIMITS.max_body_bytes,
            allowed_endpoints=["/v1/completions", "/v1/chat/completions", "/v1/models"],
            tiers=[{"name": "mock", "base_url": "http://mock.invalid"}],  # type: ignore[list-item]
        )
        status = EngineStatus()

        async def build() -> ProxyService:
            return ProxyService(
                cfg,
                PayloadLogConfig(dir=tmp, enabled=False),
                status,
                CollectorRegistry(),
                engine_base_url=lambda: "http://mock.invalid",
                transport_factory=lambda _n, _l: MockTransport(),
            )

        self.service = self.loop.run_until_complete(build())
        self.calls = 0
        handler = self.service.handler

        self.crashes: list[str] = []

        async def counting(req: Any, resp: Any) -> None:
            self.calls += 1
            try:
                await handler(req, resp)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a crash after the answer began is no 500: seen here
                self.crashes.append(repr(exc))
                raise

        self.handler = counting

    def run(self, chunks: list[bytes]) -> None:
        self.loop.run_until_complete(self._case(chunks))

    async def _case(self, chunks: list[bytes]) -> None:
        self.calls = 0
        self.crashes.clear()
        server = _Server(self.handler, self.loop)
        conn = HttpConnection(server)  # type: ignore[arg-type]
        sock = FakeSocket()
        conn.connection_made(sock)  # type: ignore[arg-type]
        for chunk in chunks:
            if sock.closed:
                break
            if sock.reading:
                conn.data_received(chunk)
            for _ in range(3):
                await asyncio.sleep(0)
        for _ in range(2000):  # let every accepted request finish
            if conn._active is None and (not conn._queue or sock.closed):
                break
            await asyncio.sleep(0)
        handler = self.service.handler
        assert handler.in_flight == 0, f"{handler.in_flight} request(s) still in flight"
        assert not self.crashes, f"the handler raised: {self.crashes}"
        heads = _response_heads(bytes(sock.out))
        statuses = [s for s, _ in heads]
        assert 500 not in statuses, f"a 500: {bytes(sock.out)[:500]!r}"
        refusals = sum(1 for _, rid in heads if rid == b"refused")
        assert refusals <= min(server.refusals, 1), f"{refusals} refusals answered {statuses}"
        answered = len(heads) - refusals
        assert answered == self.calls, f"{self.calls} requests, {len(heads)} answers {statuses}"
        conn.connection_lost(None)
        for tier in self.service.chain.tiers:
            assert tier.in_use() == 0, f"tier {tier.name} holds {tier.in_use()} slot(s)"


def _response_heads(data: bytes) -> list[tuple[int, bytes]]:
    """(status, x-request-id) of every final response in ``data``."""
    heads: list[tuple[int, bytes]] = []
    while data:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            break
        head = data[:end]
        status = int(head.split(b" ", 2)[1])
        rest = data[end + 4 :]
        if status == 100:
            data = rest
            continue
        rid = b""
        length: int | None = None
        chunked = False
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b": ")
            if k == b"x-request-id":
                rid = v
            elif k == b"content-length":
                length = int(v)
            elif k == b"transfer-encoding":
                chunked = True
        heads.append((status, rid))
        if length is not None:
            data = rest[length:]
        elif chunked:
            done = rest.find(b"0\r\n\r\n")
            data = rest[done + 5 :] if done >= 0 else b""
        else:
            data = b""
    return heads


# ---- inputs -------------------------------------------------------------------------------
_PATHS = [
    b"/v1/completions",
    b"/v1/chat/completions",
    b"/v1/models",
    b"/v1/files",
    b"/v1/../x",
    b"/v1/%2e%2e/x",
    b"/v1/a%2fb",
    b"/",
    b"*",
    b"/v1/completions?x=1",
]
_BODIES = [
    b'{"model": "m", "prompt": "hi"}',
    b'{"model": "m", "prompt": "hi", "stream": true}',
    b'{"prompt": "hi"}',
    b"[" * 100 + b"]" * 100,
    b'{"model": "m", "prompt": "\xff"}',
    b"",
    b"{",
]


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from([b"POST", b"GET", b"PUT", b"HEAD", b"BREW"]))
    path = draw(st.sampled_from(_PATHS))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/9.9"]))
    body = draw(st.sampled_from(_BODIES) | st.binary(max_size=64))
    headers = [b"host: x"]
    framing = draw(st.sampled_from(["length", "chunked", "none", "wrong"]))
    if framing == "length":
        headers.append(b"content-length: %d" % len(body))
    elif framing == "wrong":
        headers.append(b"content-length: %d" % (len(body) + draw(st.integers(-5, 5))))
    elif framing == "chunked":
        headers.append(b"transfer-encoding: chunked")
        body = (b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)) if body else b"0\r\n\r\n"
    else:
        body = b""
    extra = draw(
        st.lists(
            st.sampled_from(
                [
                    b"connection: close",
                    b"connection: keep-alive",
                    b"expect: 100-continue",
                    b"content-type: application/json",
                    b"x-request-id: " + b"r" * 200,
                    b"upgrade: h2c",
                    b"x-big: " + b"b" * 3000,
                    b"authorization: Bearer sk-x",
                ]
            ),
            max_size=3,
        )
    )
    headers += extra
    return (
        method + b" " + path + b" " + version + b"\r\n" + b"\r\n".join(headers) + b"\r\n\r\n" + body
    )


@st.composite
def streams(draw: st.DrawFn) -> list[bytes]:
    parts = draw(st.lists(requests() | st.binary(min_size=1, max_size=200), min_size=1, max_size=6))
    data = b"".join(parts)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    chunks, last = [], 0
    for c in cuts:
        if c > last:
            chunks.append(data[last:c])
            last = c
    chunks.append(data[last:])
    return [c for c in chunks if c]


def check(target: Target, examples: int, seed: int | None = None) -> None:
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=seed is None,
        suppress_health_check=list(HealthCheck),
    )
    @given(streams())
    def case(chunks: list[bytes]) -> None:
        target.run(chunks)

    if seed is not None:
        from hypothesis import seed as hseed

        case = hseed(seed)(case)
    case()


def main() -> None:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--examples", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=None)
    a = ap.parse_args()
    check(Target(Path(tempfile.mkdtemp())), a.examples, a.seed)
    print(f"{a.examples} cases: every invariant held")


if __name__ == "__main__":
    main()
