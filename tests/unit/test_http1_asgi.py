"""An ASGI app (Starlette) served by ``sentinel.http1`` through ``AsgiHandler``: whole and
streamed answers, FileResponse, HEAD, the request's scope, and an app that fails."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from sentinel.http1.asgi import AsgiHandler
from sentinel.http1.limits import HttpLimits
from sentinel.http1.server import HttpServer
from tests.loop_thread import LoopThread

BIG = 3 * 1024 * 1024  # a streamed answer well above the 64 KiB write buffer


def build_app(files: Path) -> Any:
    async def whole(_: Request) -> Response:
        return Response(b"hello world", media_type="text/plain", headers={"x-app": "1"})

    async def scope(request: Request) -> Response:
        s = request.scope
        return JSONResponse(
            {k: s[k] for k in ("http_version", "method", "scheme", "path", "root_path", "client")}
            | {
                "raw_path": s["raw_path"].decode(),
                "query_string": s["query_string"].decode(),
                "query": dict(request.query_params),
                "server_port": s["server"][1],
                "header": request.headers.get("x-probe"),
                "body": (await request.body()).decode(),
            }
        )

    async def stream(_: Request) -> Response:
        async def parts() -> AsyncIterator[bytes]:
            for i in range(BIG // 65536):
                yield bytes([65 + i % 26]) * 65536

        return StreamingResponse(parts(), media_type="application/octet-stream")

    async def file(request: Request) -> Response:
        name = request.path_params["name"]
        return FileResponse(files / name, media_type="application/gzip", filename=name)

    async def boom(_: Request) -> Response:
        raise ValueError("the app broke on purpose")

    async def boom_mid_stream(_: Request) -> Response:
        async def parts() -> AsyncIterator[bytes]:
            yield b"first part"
            raise ValueError("broke mid-stream")

        return StreamingResponse(parts())

    starlette = Starlette(
        routes=[
            Route("/whole", whole, methods=["GET", "HEAD"]),
            Route("/scope/{rest:path}", scope, methods=["GET", "POST"]),
            Route("/stream", stream),
            Route("/file/{name}", file, methods=["GET", "HEAD"]),
            Route("/boom", boom),
            Route("/boom-mid-stream", boom_mid_stream),
        ]
    )

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        # /raw/...: a bare ASGI app (Starlette's middleware answers its routes' errors)
        if scope["path"] == "/raw/boom":
            raise ValueError("the app broke on purpose")
        if scope["path"] == "/raw/nothing":
            return  # no answer at all
        await starlette(scope, receive, send)

    return app


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = Path(tmp_path_factory.mktemp("asgi-files"))
    (d / "small.tar.gz").write_bytes(b"small bundle")
    (d / "large.tar.gz").write_bytes(bytes(range(256)) * (1024 * 5))  # 1.25 MiB, 20 chunks
    return d


@pytest.fixture(scope="module")
def url(files: Path) -> Iterator[str]:
    thread = LoopThread("asgi-server")
    server = HttpServer(
        AsgiHandler(build_app(files), "test"), "127.0.0.1", 0, HttpLimits(), what="test"
    )

    async def start() -> None:
        thread.loop.create_task(server.serve(grace_s=0.5))
        await server.wait_started()

    thread.start(start)
    yield server.url

    async def stop() -> None:
        server.request_stop()

    thread.run(stop())
    thread.stop()


def test_a_whole_answer_has_its_length_and_the_apps_headers(url: str) -> None:
    r = httpx.get(url + "/whole", trust_env=False)
    assert r.status_code == 200
    assert r.content == b"hello world"
    assert r.headers["content-length"] == "11"
    assert r.headers["x-app"] == "1"
    assert "transfer-encoding" not in r.headers


def test_the_scope_carries_path_query_headers_body_and_addresses(url: str) -> None:
    r = httpx.post(
        url + "/scope/a%20b/c?x=1&y=two%20words",
        headers={"x-probe": "yes"},
        content=b"the body",
        trust_env=False,
    )
    assert r.status_code == 200
    got = r.json()
    assert got["path"] == "/scope/a b/c"  # percent-decoded
    assert got["raw_path"] == "/scope/a%20b/c"
    assert got["query_string"] == "x=1&y=two%20words"
    assert got["query"] == {"x": "1", "y": "two words"}
    assert got["method"] == "POST" and got["http_version"] == "1.1"
    assert got["scheme"] == "http" and got["root_path"] == ""
    assert got["header"] == "yes" and got["body"] == "the body"
    assert got["client"][0] == "127.0.0.1"
    assert got["server_port"] == int(url.rsplit(":", 1)[1])


def test_a_streamed_answer_arrives_whole_to_a_slow_reader(url: str) -> None:
    with httpx.Client(trust_env=False) as c, c.stream("GET", url + "/stream") as r:
        assert r.status_code == 200
        assert r.headers["transfer-encoding"] == "chunked"
        got = b"".join(r.iter_bytes(4096))
    assert len(got) == BIG
    assert got[:65536] == b"A" * 65536 and got[-1:] == bytes([65 + (BIG // 65536 - 1) % 26])


@pytest.mark.parametrize("name", ["small.tar.gz", "large.tar.gz"])
def test_file_response_sends_the_file(url: str, files: Path, name: str) -> None:
    r = httpx.get(url + f"/file/{name}", trust_env=False)
    assert r.status_code == 200
    assert r.content == (files / name).read_bytes()
    assert r.headers["content-type"] == "application/gzip"
    assert name in r.headers["content-disposition"]


def test_head_has_the_length_of_get_and_no_body(url: str, files: Path) -> None:
    for path, size in (
        ("/whole", 11),
        ("/file/large.tar.gz", (files / "large.tar.gz").stat().st_size),
    ):
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as s:
            s.sendall(b"HEAD %b HTTP/1.1\r\nhost: x\r\n\r\n" % path.encode())
            s.settimeout(5)
            out = b""
            while chunk := s.recv(65536):  # the server closes after a HEAD answer
                out += chunk
        head, _, body = out.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK")
        assert b"content-length: %d" % size in head.lower()
        assert body == b""


def test_an_app_that_raises_gets_a_500_logged_with_its_traceback(
    url: str, capfd: pytest.CaptureFixture[str]
) -> None:
    with httpx.Client(trust_env=False) as c:
        for path in ("/boom", "/raw/boom"):  # answered by Starlette's middleware, or by us
            capfd.readouterr()
            r = c.get(url + path)
            assert r.status_code == 500
            # the connection survives: the next request on it is answered
            assert c.get(url + "/whole").status_code == 200
            out = capfd.readouterr()
            text = out.out + out.err
            assert "test_app_failed" in text and "the app broke on purpose" in text
            assert "raise ValueError" in text  # the traceback
        assert r.json()["error"]["code"] == "internal_error"
        # the same failure again and again (a client found a bug): every request gets
        # its 500, the log gets no more lines for a minute (they would evict the ring)
        capfd.readouterr()
        for _ in range(50):
            assert c.get(url + "/raw/boom").status_code == 500
        out = capfd.readouterr()
        assert "test_app_failed" not in out.out + out.err


def test_an_app_that_makes_no_response_gets_a_500(url: str) -> None:
    r = httpx.get(url + "/raw/nothing", trust_env=False)
    assert r.status_code == 500
    assert "no response" in json.loads(r.content)["error"]["message"]


def test_an_app_that_raises_mid_stream_has_its_answer_cut(url: str) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(url + "/boom-mid-stream", trust_env=False)
    assert httpx.get(url + "/whole", trust_env=False).status_code == 200
