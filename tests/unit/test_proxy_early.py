"""The fast path: a request whose first tier can take it at once is sent upstream from
the read that brought it, and the upstream's answer goes to the client from the read
that brings it, without waiting for the request's task. Everything else (fallback,
timeouts, disconnects, records) behaves as on the task's path."""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from sentinel.proxy.app import _EarlyAnswer
from sentinel.proxy.rawhttp import RawResponse, RawTransport
from sentinel.proxy.server import InlineResponse
from tests.fake_openai import FakeOpenAI
from tests.helpers import dechunk, sse_chunk, wait_for
from tests.unit.proxy_harness import ProxyHarness, delay_request_tasks

BODY = {"model": "m", "prompt": "hi", "max_tokens": 3}
TASK_DELAY_S = 1.0


@pytest.fixture
def slow_tasks(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    return delay_request_tasks(monkeypatch, TASK_DELAY_S)


def _records(px: ProxyHarness, n: int) -> list[dict[str, Any]]:
    files = sorted((px.payload_cfg.dir).glob("*.jsonl"))

    def read() -> list[dict[str, Any]]:
        return [json.loads(ln) for f in files for ln in f.read_text().splitlines() if ln]

    wait_for(lambda: len(read()) >= n, 5, what=f"{n} payload records")
    return read()


def test_answers_do_not_wait_for_the_request_task(
    a: FakeOpenAI, slow_tasks: dict[str, int], tmp_path: Path
) -> None:
    with ProxyHarness({"tiers": [{"name": "a", "base_url": a.url}]}, tmp_path) as px:
        with httpx.Client(timeout=10) as client:
            # the first request opens the upstream connection: the task's path, late
            t0 = time.monotonic()
            r = client.post(px.url + "/v1/completions", json=BODY)
            assert r.status_code == 200 and time.monotonic() - t0 >= TASK_DELAY_S
            # with an idle connection to the upstream, the answer leaves at once
            t0 = time.monotonic()
            r = client.post(px.url + "/v1/completions", json=BODY, headers={"x-request-id": "w1"})
            took = time.monotonic() - t0
            assert r.status_code == 200 and r.json()["served_by"] == "a"
            assert took < TASK_DELAY_S / 2, f"whole answer took {took:.3f} s"
            assert r.headers["x-request-id"] == "w1"
            assert r.headers["x-sentinel-upstream"] == "a"
            assert r.headers["x-sentinel-fallback-hops"] == "0"
            assert a.requests[-1]["headers"]["x-request-id"] == "w1"
            # a stream: its first event, then every other, before the task has run
            t0 = time.monotonic()
            with client.stream(
                "POST",
                px.url + "/v1/completions",
                json={**BODY, "max_tokens": 5, "stream": True},
                headers={"x-request-id": "s1"},
            ) as s:
                assert s.headers["x-sentinel-upstream"] == "a"
                events = []
                for line in s.iter_lines():
                    if line.startswith("data: "):
                        events.append(line)
                        if len(events) == 1:
                            first = time.monotonic() - t0
            whole = time.monotonic() - t0
            assert first < TASK_DELAY_S / 2, f"first event took {first:.3f} s"
            assert whole < TASK_DELAY_S / 2, f"the stream took {whole:.3f} s to end"
            assert len(events) == 6 and events[-1] == "data: [DONE]"
            # the stream ended cleanly: the connection carries the next request
            r = client.post(px.url + "/v1/completions", json=BODY, headers={"x-request-id": "w2"})
            assert r.status_code == 200 and r.headers["x-request-id"] == "w2"
    # only the first request's task: the whole answers and the stream (its end, its
    # record) on the fast path were finished and recorded without one
    assert slow_tasks["tasks"] == 1
    recs = {r["request_id"]: r for r in _records(px, 4)}
    assert recs["w1"]["status"] == 200 and recs["w1"]["tier"] == "a"
    assert recs["w1"]["ttft_s"] < TASK_DELAY_S / 2
    assert recs["s1"]["stream"] is True and recs["s1"]["completion_tokens"] == 5
    assert recs["s1"]["ttft_s"] < TASK_DELAY_S / 2
    assert px.metric("sentinel_proxy_requests_total", tier="a", status="200") == 4


@pytest.mark.parametrize("failure", ["status_5xx", "status_429", "first_byte_timeout"])
def test_a_begun_request_still_falls_back(
    failure: str, a: FakeOpenAI, b: FakeOpenAI, tmp_path: Path
) -> None:
    tl = [
        {"name": f.name, "base_url": f.url, "timeouts": {"first_byte_s": 0.3, "total_s": 10}}
        for f in (a, b)
    ]
    with ProxyHarness({"tiers": tl}, tmp_path) as px:
        with httpx.Client(timeout=10) as client:
            assert client.post(px.url + "/v1/completions", json=BODY).json()["served_by"] == "a"
            if failure == "first_byte_timeout":
                a.mode["delay"] = 2.0
            else:
                a.mode["status"] = 503 if failure == "status_5xx" else 429
            for stream in (False, True):
                r = client.post(px.url + "/v1/completions", json={**BODY, "stream": stream})
                assert r.status_code == 200, r.text
                assert r.headers["x-sentinel-upstream"] == "b"
                assert r.headers["x-sentinel-fallbacks"] == f"a={failure}"
                if stream:
                    assert r.text.rstrip().endswith("data: [DONE]")
                else:
                    assert r.json()["served_by"] == "b"
            a.mode.clear()
            wait_for(lambda: a.active == 0, 3, what="a's slow requests to end")
            r = client.post(px.url + "/v1/completions", json=BODY)
            assert r.json()["served_by"] == "a"
        assert px.metric("sentinel_proxy_fallbacks_total", tier="a", reason=failure) == 2


def test_a_client_that_cannot_take_it_now_is_answered_by_the_task(
    a: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The fast path lets go (here: every time) and gives back what it took."""
    tried: list[bool] = []  # for each answer the fast path tried: was it a whole body?
    answer = _EarlyAnswer._answer

    def counted(self: _EarlyAnswer, body: bytes, whole: bool) -> bool:
        took = answer(self, body, whole)
        assert not took
        tried.append(whole)
        return took

    monkeypatch.setattr(InlineResponse, "ready", lambda self: False)
    monkeypatch.setattr(_EarlyAnswer, "_answer", counted)
    with ProxyHarness({"tiers": [{"name": "a", "base_url": a.url}]}, tmp_path) as px:
        with httpx.Client(timeout=10) as client:
            for stream in (False, False, True, True):  # the first opens a connection
                r = client.post(px.url + "/v1/completions", json={**BODY, "stream": stream})
                assert r.status_code == 200
                if stream:
                    events = [ln for ln in r.text.splitlines() if ln.startswith("data: ")]
                    assert len(events) == 4 and events[-1] == "data: [DONE]"
                else:
                    assert r.json()["served_by"] == "a"
    assert True in tried and False in tried, tried


def _post_head(body: bytes, extra: str = "") -> bytes:
    """The head of a raw ``POST /v1/completions`` of ``body``, with ``extra`` header lines."""
    return (
        f"POST /v1/completions HTTP/1.1\r\nhost: x\r\n{extra}"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode()


def _read_response(f: Any) -> tuple[int, dict[str, str], bytes]:
    status = int(f.readline().split()[1])
    headers = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        k, v = line.decode().split(":", 1)
        headers[k.strip().lower()] = v.strip()
    return status, headers, f.read(int(headers["content-length"]))


def test_pipelined_requests_are_answered_in_order(a: FakeOpenAI, tmp_path: Path) -> None:
    """A request sent before the answer to the one ahead of it waits its turn: the fast
    path never answers it out of order."""
    with ProxyHarness({"tiers": [{"name": "a", "base_url": a.url}]}, tmp_path) as px:
        host, port = px.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            f = sock.makefile("rb")

            def request(rid: str, delay: float) -> bytes:
                body = json.dumps(BODY).encode()
                return _post_head(body, f"x-request-id: {rid}\r\nx-fake-delay: {delay}\r\n") + body

            sock.sendall(request("warm", 0))  # an idle upstream connection for the next
            assert _read_response(f)[0] == 200
            # the first answer is slow, the second quick: they still come in order
            sock.sendall(request("p1", 0.3) + request("p2", 0))
            got = [_read_response(f) for _ in range(2)]
    assert [h["x-request-id"] for _, h, _ in got] == ["p1", "p2"]
    assert all(s == 200 and json.loads(b)["served_by"] == "a" for s, _, b in got)


def test_a_request_pipelined_behind_a_held_stream_waits_for_its_end(
    a: FakeOpenAI, tmp_path: Path
) -> None:
    """A request sent on the connection while a stream on the fast path is still going
    is answered after the stream's end, whole and in order."""
    with ProxyHarness({"tiers": [{"name": "a", "base_url": a.url}]}, tmp_path) as px:
        host, port = px.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            f = sock.makefile("rb")
            warm = json.dumps(BODY).encode()
            sock.sendall(_post_head(warm) + warm)  # an idle upstream connection
            assert _read_response(f)[0] == 200
            body = json.dumps({**BODY, "max_tokens": 10, "stream": True}).encode()
            sock.sendall(_post_head(body, "x-fake-chunk-interval: 0.05\r\n") + body)
            assert f.readline().startswith(b"HTTP/1.1 200")
            head = {}
            while (line := f.readline()) != b"\r\n":
                k, v = line.decode().split(":", 1)
                head[k.strip().lower()] = v.strip()
            assert head["transfer-encoding"] == "chunked"
            size = int(f.readline(), 16)  # the first event is out: the stream is going
            first = f.read(size + 2)
            assert first.startswith(b"data: ")
            sock.sendall(_post_head(warm, "x-request-id: after\r\n") + warm)
            rest = bytearray()
            while (line := f.readline()) != b"0\r\n":
                rest += f.read(int(line, 16) + 2)
            assert f.readline() == b"\r\n"
            events = [first, *rest.split(b"\n\n")]
            status, headers, answer = _read_response(f)
    assert rest.rstrip().endswith(b"data: [DONE]") and len(events) >= 11
    assert status == 200 and headers["x-request-id"] == "after"
    assert json.loads(answer)["served_by"] == "a"


@pytest.mark.parametrize("where", ["after_head", "awaiting_head"])
@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_sent_as_the_first_byte_deadline_passes_stands(
    stream: bool,
    where: str,
    a: FakeOpenAI,
    b: FakeOpenAI,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """The fast path answered the client, and only then did the request's task (already
    started) see its first-byte deadline pass (while it still waited for the head, or after it): the
    answer stands, whole or streamed to its end; nothing falls back to the next tier
    behind the client's back, and the upstream's stream is not cut."""
    resume = RawTransport.resume

    async def late(self: RawTransport, resp: RawResponse) -> RawResponse:
        begun.append(resp)
        if where == "awaiting_head":  # the task is woken for the head past the deadline
            head = resp.head_fut

            class Late(asyncio.Future[None]):
                def set_result(self, result: None) -> None:
                    head.set_result(result)  # the connection's news goes to the real one

            later = Late()

            async def wake() -> None:
                await head
                if resp.decided is not None:
                    await resp.decided  # the early hook has answered (or let go)
                await asyncio.sleep(1.0)
                asyncio.Future.set_result(later, None)

            keep.append(asyncio.ensure_future(wake()))
            resp.head_fut = later
            return await resume(self, resp)
        got = await resume(self, resp)
        if got.decided is not None:
            await got.decided
        await asyncio.sleep(1.0)  # ... and the task goes on past the deadline
        return got

    keep: list[asyncio.Future[None]] = []
    begun: list[RawResponse] = []
    monkeypatch.setattr(RawTransport, "resume", late)
    # the task starts before the answer comes, as when the first-byte deadline's timer
    # fires in the loop step whose read brings the answer (a whole answer is otherwise
    # finished without a task)
    monkeypatch.setattr(_EarlyAnswer, "hold", lambda self, deadline: self.start_task())
    timeouts = {"first_byte_s": 0.3, "total_s": 10}
    tl = [{"name": f.name, "base_url": f.url, "timeouts": timeouts} for f in (a, b)]
    with ProxyHarness({"tiers": tl}, tmp_path) as px:
        with httpx.Client(timeout=10) as client:
            body = {**BODY, "max_tokens": 12, "stream": stream}
            slow = {"x-fake-chunk-interval": "0.1"}  # a stream that outlasts the deadline
            # a whole answer leaves an idle connection behind (a stream may not)
            assert client.post(px.url + "/v1/completions", json=BODY).status_code == 200
            r = client.post(px.url + "/v1/completions", json=body, headers=slow)
            assert r.status_code == 200 and r.headers["x-sentinel-upstream"] == "a"
            if stream:
                events = [ln for ln in r.text.splitlines() if ln.startswith("data: ")]
                assert len(events) == 13 and events[-1] == "data: [DONE]"
            else:
                assert r.json()["served_by"] == "a"
        assert len(begun) == 1
        assert b.requests == []
        assert (
            px.metric("sentinel_proxy_fallbacks_total", tier="a", reason="first_byte_timeout")
            == 0.0  # exported from 0 on; never counted
        )
        wait_for(
            lambda: px.metric("sentinel_proxy_requests_total", tier="a", status="200") == 2,
            5,
            what="both requests recorded as served by a",
        )


def test_large_bodies_and_100_continue_still_reach_the_task(a: FakeOpenAI, tmp_path: Path) -> None:
    """The request's task waits for a whole body only while that costs nothing: a body
    past uvicorn's 64 KiB read buffer, or a client waiting for ``100 Continue``, starts
    it at once (else neither could ever arrive)."""
    with ProxyHarness({"tiers": [{"name": "a", "base_url": a.url}]}, tmp_path) as px:
        big = {**BODY, "prompt": "x" * (1024 * 1024)}
        r = httpx.post(px.url + "/v1/completions", json=big, timeout=10)
        assert r.status_code == 200 and r.json()["served_by"] == "a"
        assert len(a.requests[-1]["body"]["prompt"]) == 1024 * 1024
        host, port = px.url.removeprefix("http://").split(":")
        body = json.dumps(BODY).encode()
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            f = sock.makefile("rb")
            sock.sendall(_post_head(body, "expect: 100-continue\r\n"))
            assert f.readline().startswith(b"HTTP/1.1 100")  # asked for the body
            assert f.readline() == b"\r\n"
            sock.sendall(body)
            status, _, answer = _read_response(f)
    assert status == 200 and json.loads(answer)["served_by"] == "a"


def _read_request(f: Any) -> bytes:
    """One HTTP/1.1 request with a content-length body, from a socket's file."""
    length = 0
    while (line := f.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return f.read(length)


def test_an_upstream_that_drops_a_begun_request_reaches_the_task(
    slow_tasks: dict[str, int], tmp_path: Path
) -> None:
    """A begun request whose pooled upstream connection closes before any answer byte
    (the server dropped it while idle) starts the held task, which sends it again on a
    fresh connection: the client never sees the drop."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    seen: list[str] = []
    answer = json.dumps({"id": "x", "object": "text_completion", "choices": []}).encode()
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"

    def serve() -> None:
        conn, _ = srv.accept()  # the first request's connection, kept alive ...
        f = conn.makefile("rb")
        seen.append(json.loads(_read_request(f))["prompt"])
        conn.sendall(head % len(answer) + answer)
        seen.append(json.loads(_read_request(f))["prompt"])
        conn.shutdown(socket.SHUT_RDWR)  # ... then dropped with the second request unanswered
        f.close()
        conn.close()
        conn, _ = srv.accept()
        f = conn.makefile("rb")
        seen.append(json.loads(_read_request(f))["prompt"])
        conn.sendall(head % len(answer) + answer)
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    tl = [{"name": "a", "base_url": f"http://127.0.0.1:{port}"}]
    with ProxyHarness({"tiers": tl}, tmp_path) as px:
        with httpx.Client(timeout=10) as client:
            r = client.post(px.url + "/v1/completions", json={**BODY, "prompt": "one"})
            assert r.status_code == 200
            r = client.post(px.url + "/v1/completions", json={**BODY, "prompt": "two"})
            assert r.status_code == 200 and r.json()["id"] == "x"
            assert r.headers["x-sentinel-upstream"] == "a"
            assert r.headers["x-sentinel-fallback-hops"] == "0"
        t.join(5)
        srv.close()
        assert seen == ["one", "two", "two"]
        assert slow_tasks["tasks"] == 2  # the held task was started for the retry
        wait_for(  # the task records the request just after its answer
            lambda: px.metric("sentinel_proxy_requests_total", tier="a", status="200") == 2,
            5,
            what="both requests recorded",
        )


def test_a_client_that_asks_to_close_gets_a_whole_answer_then_eof(
    a: FakeOpenAI, slow_tasks: dict[str, int], tmp_path: Path
) -> None:
    """``Connection: close`` on the fast path: the answer says so, arrives whole, and
    the connection ends after it, with no task needed."""
    with ProxyHarness({"tiers": [{"name": "a", "base_url": a.url}]}, tmp_path) as px:
        assert httpx.post(px.url + "/v1/completions", json=BODY, timeout=10).status_code == 200
        host, port = px.url.removeprefix("http://").split(":")
        body = json.dumps(BODY).encode()
        t0 = time.monotonic()
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            f = sock.makefile("rb")
            sock.sendall(_post_head(body, "connection: close\r\n") + body)
            status, headers, answer = _read_response(f)
            assert f.read() == b""  # the proxy closed the connection
        took = time.monotonic() - t0
    assert status == 200 and json.loads(answer)["served_by"] == "a"
    assert headers["connection"] == "close" and headers["x-sentinel-upstream"] == "a"
    assert took < TASK_DELAY_S / 2
    assert slow_tasks["tasks"] == 1  # the first request's only


def test_the_fast_path_leaves_no_reference_cycles(a: FakeOpenAI, tmp_path: Path) -> None:
    """Requests answered on the fast path leave nothing for the cyclic garbage
    collector: a cycle per request would make its full collections, which stop the
    proxy's loop, come often and long."""
    with ProxyHarness({"tiers": [{"name": "a", "base_url": a.url}]}, tmp_path) as px:
        with httpx.Client(timeout=10) as client:
            assert client.post(px.url + "/v1/completions", json=BODY).status_code == 200
            created: dict[str, int] = {}
            real = _EarlyAnswer.__init__

            def counted(self: _EarlyAnswer, *args: Any) -> None:
                created["hooks"] = created.get("hooks", 0) + 1
                real(self, *args)

            _EarlyAnswer.__init__ = counted  # type: ignore[method-assign]
            try:
                gc.collect()
                gc.disable()
                for i in range(40):  # whole answers and streams, both without a task
                    body = {**BODY, "stream": i % 2 == 1}
                    assert client.post(px.url + "/v1/completions", json=body).status_code == 200
                found = [o for o in gc.get_objects() if isinstance(o, _EarlyAnswer)]
                gc.collect()
                left = [o for o in gc.get_objects() if isinstance(o, _EarlyAnswer)]
            finally:
                gc.enable()
                _EarlyAnswer.__init__ = real  # type: ignore[method-assign]
    assert created["hooks"] == 40  # every request took the fast path
    # without the collector, every hook but the last few is already freed
    assert len(found) <= 2, f"{len(found)} fast-path hooks wait for the garbage collector"
    assert len(left) <= 2


# ---- a stream relayed from the upstream's reads, with its task held back ----------------
WHOLE = json.dumps({"id": "x", "object": "text_completion", "choices": []}).encode()
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)


def _keepalive_upstream(stream: Callable[[socket.socket], None]) -> tuple[str, threading.Thread]:
    """An upstream that answers a first request whole on a kept-alive connection (so the
    next request is begun on it, the fast path), then the second with ``stream``."""
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = srv.accept()
        f = conn.makefile("rb")
        _read_request(f)
        conn.sendall(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (len(WHOLE), WHOLE)
        )
        _read_request(f)
        conn.sendall(SSE_HEAD)
        try:
            stream(conn)
        finally:
            f.close()
            conn.close()
            srv.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return f"http://127.0.0.1:{srv.getsockname()[1]}", t


def _events(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("data: ")]


def test_a_held_stream_cut_by_its_upstream_ends_with_an_error_event(
    slow_tasks: dict[str, int], tmp_path: Path
) -> None:
    """The upstream dies mid-stream while the stream goes on from its reads: the held
    task takes over and ends the stream with an error event the client can parse."""

    def half(conn: socket.socket) -> None:
        conn.sendall(sse_chunk(b'data: {"choices":[{"text":"x"}]}\n\n'))
        time.sleep(0.2)

    url, _ = _keepalive_upstream(half)
    with ProxyHarness({"tiers": [{"name": "a", "base_url": url}]}, tmp_path) as px:
        with httpx.Client(timeout=10) as client:
            assert client.post(px.url + "/v1/completions", json=BODY).status_code == 200
            t0 = time.monotonic()
            with client.stream(
                "POST", px.url + "/v1/completions", json={**BODY, "stream": True}
            ) as r:
                lines = r.iter_lines()
                first = next(ln for ln in lines if ln.startswith("data: "))
                took = time.monotonic() - t0
                events = [first, *(ln for ln in lines if ln.startswith("data: "))]
    assert took < TASK_DELAY_S / 2  # the first event came from the upstream's read
    assert len(events) == 2, events
    err = json.loads(events[-1][len("data: ") :])
    assert err["error"]["code"] == "reset" and "mid-stream" in err["error"]["message"]
    assert slow_tasks["tasks"] == 2  # the first request's, and the one that took over
    rec = {r["request_id"]: r for r in _records(px, 2)}
    (cut,) = [r for r in rec.values() if r["stream"]]
    assert "mid-stream" in cut["error"]


def test_a_held_stream_stops_at_its_total_time_limit(a: FakeOpenAI, tmp_path: Path) -> None:
    """The tier's total time limit ends a stream that goes on from the upstream's reads:
    the upstream request is cancelled and the client gets a timeout error event."""
    tl = [{"name": "a", "base_url": a.url, "timeouts": {"first_byte_s": 5, "total_s": 0.6}}]
    with ProxyHarness({"tiers": tl}, tmp_path) as px:
        with httpx.Client(timeout=10) as client:
            assert client.post(px.url + "/v1/completions", json=BODY).status_code == 200
            t0 = time.monotonic()
            r = client.post(
                px.url + "/v1/completions",
                json={**BODY, "max_tokens": 100, "stream": True},
                headers={"x-fake-chunk-interval": "0.05"},
            )
            took = time.monotonic() - t0
        events = _events(r.text)
        err = json.loads(events[-1][len("data: ") :])
        assert err["error"]["code"] == "timeout", events[-3:]
        assert 3 < len(events) < 40 and took < 3
        wait_for(lambda: a.active == 0, 1, interval=0.01, what="upstream request cancelled")


def test_a_client_leaving_a_held_stream_cancels_its_upstream_request(
    a: FakeOpenAI, tmp_path: Path
) -> None:
    with ProxyHarness({"tiers": [{"name": "a", "base_url": a.url}]}, tmp_path) as px:
        assert httpx.post(px.url + "/v1/completions", json=BODY, timeout=10).status_code == 200
        host, port = px.url.removeprefix("http://").split(":")
        body = json.dumps({**BODY, "max_tokens": 200, "stream": True}).encode()
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(_post_head(body, "x-fake-chunk-interval: 0.05\r\n") + body)
            got = b""
            while got.count(b"data: ") < 3:
                got += sock.recv(65536)
            assert a.active == 1
        wait_for(lambda: a.active == 0, 1, interval=0.01, what="upstream request cancelled")
        wait_for(
            lambda: px.metric("sentinel_proxy_client_disconnects_total", tier="a") == 1,
            2,
            what="the disconnect counted",
        )
        (rec,) = [r for r in _records(px, 2) if r["stream"]]
    assert rec["client_disconnect"] is True and rec["tier"] == "a"


def test_a_slow_client_of_a_held_stream_gets_every_byte_in_order(tmp_path: Path) -> None:
    """A client that falls behind a stream going on from the upstream's reads: the part
    it cannot take is queued and the held task relays the rest with back-pressure."""
    n, size = 1500, 16 * 1024  # ~24 MB, far more than the socket buffers hold

    def flood(conn: socket.socket) -> None:
        for i in range(n):
            conn.sendall(sse_chunk(b"data: %06d %s\n\n" % (i, b"x" * size)))
        conn.sendall(sse_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        time.sleep(0.5)

    url, upstream = _keepalive_upstream(flood)
    with ProxyHarness({"tiers": [{"name": "a", "base_url": url}]}, tmp_path) as px:
        host, port = px.url.removeprefix("http://").split(":")
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)  # before connect
            sock.settimeout(20)
            sock.connect((host, int(port)))
            f = sock.makefile("rb")
            warm = json.dumps(BODY).encode()
            sock.sendall(_post_head(warm) + warm)
            assert _read_response(f)[0] == 200
            body = json.dumps({**BODY, "stream": True}).encode()
            sock.sendall(_post_head(body, "connection: close\r\n") + body)
            time.sleep(1.0)  # not reading: the proxy must stop taking from the upstream
            assert upstream.is_alive()
            received = f.read()
    head, _, chunked = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    payload = dechunk(chunked)
    numbers = [ln[6:12] for ln in payload.split(b"\n") if ln.startswith(b"data: ")]
    assert numbers == [b"%06d" % i for i in range(n)] + [b"[DONE]"]
    assert payload.count(b"x" * size) == n
