"""Sentinel's upstream HTTP client: keep-alive reuse, stale connections, body framing,
chunk-by-chunk delivery, connection errors."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from sentinel.proxy.rawhttp import RawTransport
from sentinel.proxy.upstream import UpstreamError, UpstreamRequest
from tests.helpers import free_port


def req(port: int, target: str = "/v1/x", body: bytes = b"{}") -> UpstreamRequest:
    return UpstreamRequest("POST", f"http://127.0.0.1:{port}", target, [(b"a", b"b")], body, 1.0)


async def serve(handler):  # type: ignore[no-untyped-def]
    conns = []

    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conns.append(w)
        await handler(r, w)

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], conns


async def read_request(r: asyncio.StreamReader) -> bytes:
    head = await r.readuntil(b"\r\n\r\n")
    n = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            n = int(line.split(b":")[1])
    return head + (await r.readexactly(n) if n else b"")


def keep_alive(answer):  # type: ignore[no-untyped-def]
    """A handler answering every request of a keep-alive connection with
    ``answer(raw request)``: the body of a 200."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            try:
                raw = await read_request(r)
            except asyncio.IncompleteReadError:
                return
            body = answer(raw)
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            await w.drain()

    return handler


def test_keep_alive_reuse_and_stale_connection_retry() -> None:
    async def main() -> None:
        def ok(raw: bytes) -> bytes:
            assert b"host: 127.0.0.1:" in raw and b"a: b" in raw
            return b"ok"

        server, port, conns = await serve(keep_alive(ok))
        t = RawTransport()
        for _ in range(3):
            resp = await t.send(req(port))
            assert resp.status == 200 and await resp.read() == b"ok"
        assert len(conns) == 1  # one connection, reused
        conns[0].close()  # the server drops the idle connection
        await asyncio.sleep(0.05)
        resp = await t.send(req(port))
        assert await resp.read() == b"ok"
        assert len(conns) == 2
        await t.aclose()
        server.close()

    asyncio.run(main())


def test_close_delimited_and_chunked_bodies_arrive_chunk_by_chunk() -> None:
    async def main() -> None:
        async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            raw = await read_request(r)
            if b"/close" in raw:
                w.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\npart1")
                await w.drain()
                await asyncio.sleep(0.05)
                w.write(b"part2")
                await w.drain()
                w.close()
                return
            w.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n"
            )
            for i in range(3):
                ev = b"data: %d\n\n" % i
                w.write(b"%x\r\n%s\r\n" % (len(ev), ev))
                await w.drain()
                await asyncio.sleep(0.05)
            w.write(b"0\r\n\r\n")
            await w.drain()

        server, port, _ = await serve(handler)
        t = RawTransport()
        resp = await t.send(req(port, "/close"))
        assert resp.content_length is None
        assert await resp.read() == b"part1part2"
        resp = await t.send(req(port, "/sse"))
        assert resp.content_type == "text/event-stream"
        chunks = [c async for c in resp.chunks()]
        assert chunks == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]  # never merged
        await t.aclose()
        server.close()

    asyncio.run(main())


def test_connection_errors() -> None:
    async def main() -> None:
        t = RawTransport()
        with pytest.raises(UpstreamError) as err:
            await t.send(req(free_port()))
        assert err.value.reason == "connect_error"

        async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await read_request(r)
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nshort")
            await w.drain()
            w.transport.abort()  # reset mid-body

        server, port, _ = await serve(handler)
        resp = await t.send(req(port))
        with pytest.raises(UpstreamError) as err:
            await resp.read()
        assert err.value.reason == "reset"
        await t.aclose()
        server.close()

    asyncio.run(main())


def test_a_connection_the_upstream_closes_as_the_request_goes_out_is_retried() -> None:
    """The upstream drops an idle pooled connection just as the next request is written
    on it (its close not yet seen here): the request goes again, once, on a fresh
    connection, and gets its own answer."""

    async def main() -> None:
        server, port, conns = await serve(keep_alive(lambda raw: raw.split(b"\r\n\r\n", 1)[1]))
        t = RawTransport()
        assert await (await t.send(req(port, body=b"one"))).read() == b"one"
        assert len(conns) == 1
        conns[0].close()  # no await before the next send: the pool still holds it
        resp = await t.send(req(port, body=b"two"))
        assert await resp.read() == b"two"
        assert len(conns) == 2
        await t.aclose()
        server.close()

    asyncio.run(main())


def test_interim_1xx_answers_are_skipped_and_each_request_gets_its_own_body() -> None:
    """An upstream that sends ``103 Early Hints`` (or 100, 102) before every answer, then
    the real 200 a little later: 200 requests on pooled connections each get their own
    body (a 1xx was taken as the answer, and the real one handed to the next request on
    the connection: 43-51 of 200 got another request's answer)."""

    async def main() -> None:
        async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            n = 0
            while True:
                try:
                    raw = await read_request(r)
                except asyncio.IncompleteReadError:
                    return
                n += 1
                interim = (b"100 Continue", b"102 Processing", b"103 Early Hints")[n % 3]
                w.write(b"HTTP/1.1 " + interim + b"\r\nlink: </style.css>; rel=preload\r\n\r\n")
                await w.drain()
                await asyncio.sleep(0.002)
                body = raw.split(b"\r\n\r\n", 1)[1]
                w.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                await w.drain()

        server, port, conns = await serve(handler)
        t = RawTransport()
        wrong: list[tuple[bytes, bytes]] = []

        async def one(i: int) -> None:
            body = b"request-%d" % i
            resp = await t.send(req(port, body=body))
            got = await resp.read()
            if resp.status != 200 or got != body or any(k == b"link" for k, _ in resp.headers):
                wrong.append((body, got))

        for start in range(0, 200, 8):  # 8 at a time: pooled connections reused
            await asyncio.gather(*(one(i) for i in range(start, start + 8)))
        assert wrong == []
        assert len(conns) <= 16  # the connections were pooled and reused
        await t.aclose()
        server.close()

    asyncio.run(main())


def test_bytes_nobody_asked_for_spoil_the_connection() -> None:
    """An upstream that sends a second answer after the first: the connection is never
    pooled with those bytes unread; the next request goes on a fresh connection and
    gets its own answer."""

    async def main() -> None:
        async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while True:
                try:
                    raw = await read_request(r)
                except asyncio.IncompleteReadError:
                    return
                body = raw.split(b"\r\n\r\n", 1)[1]
                answer = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
                w.write(answer + b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nstray")
                await w.drain()

        server, port, conns = await serve(handler)
        t = RawTransport()
        for i in range(5):
            resp = await t.send(req(port, body=b"body-%d" % i))
            assert await resp.read() == b"body-%d" % i
            await asyncio.sleep(0.01)
        assert len(conns) == 5  # none reused
        await t.aclose()
        server.close()

    asyncio.run(main())


def test_a_reset_before_a_close_delimited_body_ends_is_a_failure() -> None:
    async def main() -> None:
        async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            raw = await read_request(r)
            w.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\npart1")
            await w.drain()
            await asyncio.sleep(0.05)
            if b"/reset" in raw:
                sock = w.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                w.transport.abort()  # RST: the body was cut, not ended
            else:
                w.close()  # a clean close ends the body

        server, port, _ = await serve(handler)
        t = RawTransport()
        resp = await t.send(req(port, "/reset"))
        with pytest.raises(UpstreamError) as err:
            await resp.read()
        assert err.value.reason == "reset"
        resp = await t.send(req(port, "/clean"))
        assert await resp.read() == b"part1"
        await t.aclose()
        server.close()

    asyncio.run(main())


def test_a_bug_in_our_parser_callbacks_is_not_an_upstream_fault(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An exception in our own code while parsing a healthy answer is reported as
    ``internal_error`` with ``upstream_fault`` False (the breaker is not told), never as
    a malformed upstream response."""
    from sentinel.proxy import upstream_conn

    def broken(self: object, name: bytes, value: bytes) -> None:
        raise KeyError("a bug of ours")

    async def main() -> None:
        server, port, _ = await serve(keep_alive(lambda raw: b"ok"))
        t = RawTransport()
        monkeypatch.setattr(upstream_conn.UpstreamConnection, "on_header", broken)
        with pytest.raises(UpstreamError) as err:
            await t.send(req(port))
        assert err.value.reason == "internal_error" and not err.value.upstream_fault
        assert "malformed" not in err.value.detail
        await t.aclose()
        server.close()

    asyncio.run(main())


def test_an_upstream_head_over_the_limit_is_a_malformed_answer() -> None:
    """An upstream that sends header after header is cut off once its head passes
    MAX_UPSTREAM_HEAD_BYTES (a ``reset``, a health failure): it is not held in memory
    nor relayed. A large head under the limit, read in many parts, is answered, and the
    count starts again for the next answer on the same connection."""
    from sentinel.proxy.upstream_conn import MAX_UPSTREAM_HEAD_BYTES

    line = b"x-junk: " + b"j" * 1000 + b"\r\n"

    async def heads(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            try:
                raw = await read_request(r)
            except asyncio.IncompleteReadError:
                return
            w.write(b"HTTP/1.1 200 OK\r\n")
            n = 40 if b"/small" in raw else 100_000  # 40 KiB, or endless (~100 MB)
            for _ in range(n):
                w.write(line)
                await w.drain()
                await asyncio.sleep(0)
            w.write(b"content-length: 2\r\n\r\nok")
            await w.drain()

    async def main() -> None:
        server, port, conns = await serve(heads)
        t = RawTransport()
        for _ in range(2):  # 2 x 40 KiB heads on one connection: 80 KiB in all
            resp = await t.send(req(port, "/small"))
            assert resp.status == 200 and await resp.read() == b"ok"
            assert len(resp.headers) == 41
        assert len(conns) == 1
        with pytest.raises(UpstreamError) as exc:
            await t.send(req(port, "/big"))
        assert exc.value.reason == "reset" and exc.value.upstream_fault
        assert "head too large" in exc.value.detail
        assert str(MAX_UPSTREAM_HEAD_BYTES) in exc.value.detail
        await t.aclose()
        server.close()

    asyncio.run(main())
