"""The traffic port against clients that bend HTTP/1.1: a client that stops reading,
trailers of a chunked body, a head read with the previous body's end, a refusal behind
a request in flight, a held-back 100-continue, HEAD."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fake_openai import FakeOpenAI
from tests.helpers import wait_for
from tests.unit.proxy_harness import ProxyHarness
from tests.unit.test_proxy_http1 import BODY, connect, post, read_all, read_responses

LIMITS = {
    "max_request_line_bytes": 1024,
    "max_header_bytes": 4096,
    "header_timeout_s": 0.5,
    "body_timeout_s": 0.5,
    "keepalive_timeout_s": 0.5,
    "send_timeout_s": 0.5,
    "max_connections": 4,
}


@pytest.fixture(scope="module")
def up() -> Iterator[FakeOpenAI]:
    with FakeOpenAI("up") as a:
        yield a


@pytest.fixture(scope="module")
def px(up: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyHarness]:
    cfg = {"tiers": [{"name": "up", "base_url": up.url}], "limits": LIMITS}
    with ProxyHarness(cfg, Path(tmp_path_factory.mktemp("h1hostile"))) as h:
        yield h


def statuses(out: bytes) -> list[bytes]:
    return re.findall(rb"HTTP/1\.1 \d+ [A-Za-z ]+", out)


def refusals(px: ProxyHarness, reason: str) -> float:
    return px.metric("sentinel_proxy_client_refusals_total", reason=reason) or 0.0


def test_a_client_that_stops_reading_is_aborted_after_the_send_timeout(
    px: ProxyHarness,
) -> None:
    """Clients that ask for a large answer and never read: each is aborted once it has
    taken nothing for send_timeout_s (the idle close's flush no longer waits for ever),
    counted, and the connection cap is free again for a client that reads."""
    before = refusals(px, "send_timeout")
    big = b'{"model": "m", "prompt": "hi", "max_tokens": 400000}'  # a ~3 MB answer
    held = []
    for _ in range(LIMITS["max_connections"]):
        host, port = px.url.removeprefix("http://").split(":")
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect((host, int(port)))
        s.sendall(post(big))
        held.append(s)  # never read
    wait_for(
        lambda: px.metric("sentinel_proxy_open_connections") == len(held),
        10,
        what="the non-reading clients' connections",
    )
    wait_for(
        lambda: px.metric("sentinel_proxy_open_connections") == 0,
        20,
        what="the non-reading clients' connections to be aborted",
    )
    assert refusals(px, "send_timeout") - before == len(held)
    s = connect(px)
    s.sendall(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n")
    [(head, _)] = read_responses(s, 1)
    assert head.startswith(b"HTTP/1.1 200")
    for c in held + [s]:
        c.close()


def test_a_pipelining_non_reader_holds_at_most_16_requests_and_is_aborted() -> None:
    """Requests pipelined while answers wait unsent: at most MAX_PIPELINED are parsed
    (the rest of a read waits unparsed), a timer guards the wait, and a client that takes
    nothing for send_timeout_s is aborted; one that reads gets every answer in order."""
    from fuzz.request_path import LIMITS as FUZZ_LIMITS
    from fuzz.request_path import FakeSocket, _Server
    from sentinel.http1.connection import MAX_PIPELINED, HttpConnection

    handled: list[bytes] = []

    async def handler(req: Any, resp: Any) -> None:
        handled.append(req.target)
        resp.whole(200, [], b"ok")

    class Held(FakeSocket):  # a client whose socket takes nothing
        aborted = False

        def get_write_buffer_size(self) -> int:
            return 100_000

        def abort(self) -> None:
            self.aborted = True
            super().abort()

    async def run(sock: FakeSocket, resume: bool) -> HttpConnection:
        loop = asyncio.get_running_loop()
        server = _Server(handler, loop)
        server.limits = dataclasses.replace(FUZZ_LIMITS, send_timeout_s=0.2)
        conn = HttpConnection(server)  # type: ignore[arg-type]
        conn.connection_made(sock)  # type: ignore[arg-type]
        conn.data_received(b"GET /1 HTTP/1.1\r\n\r\n")
        await asyncio.sleep(0.01)
        conn.pause_writing()  # the client stopped reading
        conn.data_received(b"".join(b"GET /%d HTTP/1.1\r\n\r\n" % i for i in range(2, 200)))
        await asyncio.sleep(0.01)
        assert handled == [b"/1"]
        assert len(conn._queue) == MAX_PIPELINED
        assert conn._timer is not None
        if resume:
            conn.resume_writing()
            for _ in range(2000):
                await asyncio.sleep(0)
            assert handled == [b"/%d" % i for i in range(1, 200)]
        else:
            await asyncio.sleep(0.4)
        return conn

    async def main() -> None:
        sock = Held()
        conn = await run(sock, resume=False)
        assert sock.aborted and conn.closing
        handled.clear()
        sock = FakeSocket()
        await run(sock, resume=True)
        assert bytes(sock.out).count(b"HTTP/1.1 200 OK") == 199

    asyncio.run(main())


def test_a_chunked_body_with_an_endless_trailer_gets_413(px: ProxyHarness, up: FakeOpenAI) -> None:
    """Trailer fields count against the body's limit (with a small framing allowance)
    and never join the request's headers."""
    n = len(up.requests)
    s = connect(px)
    s.sendall(
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"transfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\nx-trailer: " % (len(BODY), BODY)
    )
    try:
        for _ in range(6 * 16):  # 6 MiB of trailer, beyond max_body_bytes (4 MiB)
            s.sendall(b"a" * 65536)
    except (BrokenPipeError, ConnectionResetError):
        pass
    out = read_all(s, 5)
    assert out.startswith(b"HTTP/1.1 413"), out[:200]
    assert b"body_too_large" in out
    assert len(up.requests) == n


def test_a_small_trailer_is_dropped_not_forwarded(px: ProxyHarness, up: FakeOpenAI) -> None:
    s = connect(px)
    s.sendall(
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"transfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\nx-trailer: t\r\n\r\n"
        % (len(BODY), BODY)
    )
    [(head, _)] = read_responses(s, 1)
    assert head.startswith(b"HTTP/1.1 200")
    assert "x-trailer" not in up.requests[-1]["headers"]
    s.close()


def test_a_head_read_with_the_previous_body_end_meets_the_head_limit(
    px: ProxyHarness, up: FakeOpenAI
) -> None:
    big = b"".join(b"x-big-%d: %s\r\n" % (i, b"a" * 1000) for i in range(20))  # 20 KB
    n = len(up.requests)
    first = post()
    s = connect(px)
    s.sendall(first[:-1])
    time.sleep(0.1)
    s.sendall(first[-1:] + post(extra=big))  # the body's last byte, then the big head
    out = read_all(s, 5)
    assert statuses(out) == [b"HTTP/1.1 200 OK", b"HTTP/1.1 431 Request Header Fields Too Large"]
    assert len(up.requests) == n + 1


def test_a_refusal_behind_a_request_in_flight_is_answered_in_its_turn(
    px: ProxyHarness, up: FakeOpenAI
) -> None:
    big = b"".join(b"x-big-%d: %s\r\n" % (i, b"a" * 1000) for i in range(20))
    s = connect(px)
    s.sendall(post(extra=b"x-fake-delay: 0.3\r\n"))
    time.sleep(0.1)  # in flight upstream
    s.sendall(post(extra=big))
    out = read_all(s, 5)
    assert statuses(out) == [
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 431 Request Header Fields Too Large",
    ]
    first, _, second = out.partition(b"HTTP/1.1 431")
    assert b"connection: close" not in first  # the close comes with the last answer
    assert b"connection: close" in second


def test_a_100_continue_held_behind_a_long_answer_starts_the_body_timer_when_sent(
    px: ProxyHarness,
) -> None:
    s = connect(px)
    s.sendall(post(extra=b"x-fake-delay: 1.2\r\n"))  # longer than body_timeout_s (0.5)
    time.sleep(0.05)
    head = post(extra=b"expect: 100-continue\r\n")
    s.sendall(head[: -len(BODY)])
    buf = b""
    deadline = time.monotonic() + 5
    while b"HTTP/1.1 100 Continue\r\n\r\n" not in buf and time.monotonic() < deadline:
        s.settimeout(5)
        buf += s.recv(65536)
    assert buf.startswith(b"HTTP/1.1 200"), buf[:100]
    assert b"HTTP/1.1 100 Continue" in buf
    s.sendall(BODY)
    rest = buf.split(b"HTTP/1.1 100 Continue\r\n\r\n", 1)[1]
    s.sendall(b"GET /v1/models HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    out = rest + read_all(s, 5)
    assert statuses(out) == [b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK"]


def test_head_gets_a_head_only(px: ProxyHarness) -> None:
    s = connect(px)
    s.sendall(b"HEAD /v1/models HTTP/1.1\r\nhost: x\r\n\r\n")
    out = read_all(s, 5)
    head, _, rest = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405")
    assert b"content-length: " in head
    assert rest == b""


H2C = (
    b"connection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\n"
    b"http2-settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
)


@pytest.mark.parametrize("split", [False, True], ids=["one-read", "body-later"])
def test_a_post_offering_h2c_is_served_as_http11_with_its_body(
    px: ProxyHarness, up: FakeOpenAI, split: bool
) -> None:
    """What `curl --http2 http://...` sends: the offer is ignored (RFC 9110 allows it),
    the request is answered as HTTP/1.1 with its body, and the connection closes."""
    n = len(up.requests)
    raw = post(extra=H2C)
    s = connect(px)
    if split:
        s.sendall(raw[: -len(BODY)])
        time.sleep(0.1)
        s.sendall(BODY)
    else:
        s.sendall(raw)
    out = read_all(s, 5)
    assert statuses(out) == [b"HTTP/1.1 200 OK"], out[:300]
    assert len(up.requests) == n + 1
    assert up.requests[-1]["body"]["prompt"] == "hi"


def test_a_chunked_post_offering_an_upgrade_gets_a_clear_400(px: ProxyHarness) -> None:
    s = connect(px)
    s.sendall(
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"transfer-encoding: chunked\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (H2C, len(BODY), BODY)
    )
    out = read_all(s, 5)
    assert out.startswith(b"HTTP/1.1 400"), out[:200]
    assert b"upgrade_not_supported" in out


def test_a_204_or_304_is_relayed_without_length_or_body() -> None:
    """An upstream's 204 (or 304) reaches the client with no Content-Length and no body,
    even where the upstream sent one (RFC 9110: a 204 never carries Content-Length)."""
    from sentinel.http1.response import Request, Response

    class Conn:
        closing = False
        queued = False

        def __init__(self) -> None:
            self.out: list[bytes] = []

        def write(self, data: bytes) -> None:
            self.out.append(data)

    for status in (204, 304):
        conn = Conn()
        Response(conn, Request()).whole(status, [(b"x-a", b"1")], b"stray")  # type: ignore[arg-type]
        (raw,) = conn.out
        head, sep, rest = raw.partition(b"\r\n\r\n")
        assert sep and rest == b"", raw
        assert b"content-length" not in head and b"x-a: 1" in head
