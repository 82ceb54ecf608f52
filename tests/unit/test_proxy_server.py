"""The proxy's server: a response head leaves with the first body part in one system
call, stream chunks go straight through, in order, and nothing after a close."""

from __future__ import annotations

import asyncio
import socket

from sentinel.proxy.server import ProxyServer, _CorkedTransport


class _Recorder:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.events: list[str] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        self.events.append("write")

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True
        self.events.append("close")

    def abort(self) -> None:
        self.closing = True
        self.events.append("abort")

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


def _corked() -> tuple[_Recorder, _CorkedTransport]:
    """A corked transport over a recorder, on the running loop."""
    inner = _Recorder()
    return inner, _CorkedTransport(inner, asyncio.get_running_loop())  # type: ignore[arg-type]


def test_a_head_leaves_with_the_first_body_part_and_close_flushes_first() -> None:
    async def main() -> None:
        inner, t = _corked()
        t.write(b"HTTP/1.1 200 OK\r\n\r\n")
        assert inner.writes == []  # the head waits for the body
        t.write(b"")
        t.write(b"body")
        assert inner.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]  # one write, at once
        t.write(b"chunk-1")
        t.write(b"chunk-2")  # a stream's later parts: straight through, one write each
        assert inner.writes[1:] == [b"chunk-1", b"chunk-2"]
        await asyncio.sleep(0)
        assert len(inner.writes) == 3  # nothing written twice at the step's end
        t.write(b"HTTP/1.1 200 OK\r\n\r\n")
        await asyncio.sleep(0)  # a head alone leaves when the step ends
        assert inner.writes[-1] == b"HTTP/1.1 200 OK\r\n\r\n"
        t.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        t.close()  # written before the close, in order
        assert inner.events[-2:] == ["write", "close"]
        assert inner.writes[-1] == b"HTTP/1.1 204 No Content\r\n\r\n"
        await asyncio.sleep(0)
        assert len(inner.writes) == 5
        assert t.get_extra_info("peername") == "info:peername"  # the rest is delegated

    asyncio.run(main())


def test_abort_drops_unsent_bytes_and_a_closing_transport_gets_none() -> None:
    async def main() -> None:
        inner, t = _corked()
        t.write(b"HTTP/1.1 200 OK\r\n\r\n")
        t.abort()
        await asyncio.sleep(0)
        assert inner.writes == [] and inner.events == ["abort"]
        inner2, t2 = _corked()
        t2.write(b"HTTP/1.1 200 OK\r\n\r\n")
        inner2.closing = True  # the peer went away before the step ended
        await asyncio.sleep(0)
        assert inner2.writes == []

    asyncio.run(main())


def test_served_responses_are_whole_and_keep_alive_works() -> None:
    """Through the real server: a fixed-length answer, then a chunked one with a
    pause between its parts, on one keep-alive connection."""

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            return
        await receive()
        if scope["path"] == "/fixed":
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-length", b"5")],
                }
            )
            await send({"type": "http.response.body", "body": b"hello"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await asyncio.sleep(0.05)
        await send({"type": "http.response.body", "body": b"data: 2\n\n", "more_body": False})

    async def main() -> None:
        server = ProxyServer(app, "127.0.0.1", 0)
        task = asyncio.create_task(server.serve())
        await server.wait_started()
        loop = asyncio.get_running_loop()
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.setblocking(False)

        async def exchange(path: str, until: bytes) -> bytes:
            await loop.sock_sendall(sock, f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
            got = b""
            async with asyncio.timeout(5):
                while not got.endswith(until):
                    got += await loop.sock_recv(sock, 65536)
            return got

        fixed = await exchange("/fixed", b"hello")
        assert fixed.startswith(b"HTTP/1.1 200 OK\r\n") and b"content-length: 5\r\n" in fixed
        streamed = await exchange("/stream", b"0\r\n\r\n")
        assert b"transfer-encoding: chunked" in streamed
        assert b"data: 1\n\n" in streamed and b"data: 2\n\n" in streamed
        sock.close()
        server.request_stop()
        await asyncio.wait_for(task, 10)

    asyncio.run(main())
