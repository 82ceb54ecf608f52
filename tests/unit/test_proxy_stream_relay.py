"""A stream's parts reach the client one by one as they arrive, every event in order;
a client that reads slower than the upstream sends gets every byte, in order, through
back-pressure (the upstream is read no faster than the client reads)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import accept_sse, dechunk, free_port, sse_chunk, wait_for
from tests.unit.proxy_harness import ProxyHarness

BODY = {"model": "m", "prompt": "hi", "max_tokens": 3, "stream": True}


def _event(i: int, size: int) -> bytes:
    return b"data: %06d %s\n\n" % (i, b"x" * size)


def _sse_upstream(events: int, size: int, gap_s: float) -> tuple[str, threading.Thread]:
    """One streamed answer of ``events`` chunked SSE events (numbered), then [DONE]."""
    srv = socket.create_server(("127.0.0.1", free_port()))

    def serve() -> None:
        conn = accept_sse(srv)
        for i in range(events):
            conn.sendall(sse_chunk(_event(i, size)))
            if gap_s:
                time.sleep(gap_s)
        conn.sendall(sse_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        time.sleep(0.5)
        conn.close()
        srv.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return f"http://127.0.0.1:{srv.getsockname()[1]}", t


@pytest.fixture
def harness_for(tmp_path: Path) -> Iterator[Callable[[str], ProxyHarness]]:
    started: list[ProxyHarness] = []

    def make(url: str) -> ProxyHarness:
        px = ProxyHarness({"tiers": [{"name": "up", "base_url": url}]}, tmp_path).start()
        started.append(px)
        return px

    yield make
    for px in started:
        px.stop()


def _numbers(text: str) -> list[Any]:
    out: list[Any] = []
    for line in text.split("\n"):
        if line.startswith("data: "):
            rest = line[len("data: ") :]
            out.append(rest if rest == "[DONE]" else int(rest.split(" ")[0]))
    return out


def test_a_streams_parts_go_out_one_by_one_in_order(
    harness_for: Callable[[str], ProxyHarness],
) -> None:
    url, _ = _sse_upstream(events=30, size=20, gap_s=0.005)
    px = harness_for(url)
    with httpx.stream("POST", px.url + "/v1/completions", json=BODY) as r:
        assert r.status_code == 200
        chunks = list(r.iter_raw())
    got = _numbers(b"".join(chunks).decode())
    assert got == [*range(30), "[DONE]"]  # every event, in order, nothing merged away
    assert len(chunks) >= 20  # chunk by chunk, not buffered into a few big reads


def test_a_slow_client_gets_every_byte_in_order_through_back_pressure(
    harness_for: Callable[[str], ProxyHarness],
) -> None:
    events, size = 1500, 16 * 1024  # ~24 MB, far more than the socket buffers hold
    url, upstream = _sse_upstream(events=events, size=size, gap_s=0.0)
    px = harness_for(url)
    host, port = px.url.removeprefix("http://").split(":")
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    client.connect((host, int(port)))
    body = b'{"model": "m", "prompt": "hi", "stream": true}'
    client.sendall(
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
    )
    time.sleep(1.0)  # not reading: the proxy must stop taking from the upstream
    assert upstream.is_alive()  # the upstream is still blocked sending, not done
    assert px.service is not None
    server = px.service.server
    held = px.call(
        lambda: max(c.transport.get_write_buffer_size() for c in server.connections if c.transport)
    )
    # what Sentinel holds for the client: its high-water mark plus one upstream read
    assert held <= 64 * 1024 + 256 * 1024, held
    received = bytearray()
    client.settimeout(20)
    while chunk := client.recv(1 << 20):
        received += chunk
    client.close()
    head, _, chunked = bytes(received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    payload = dechunk(chunked)
    assert _numbers(payload.decode()) == [*range(events), "[DONE]"]
    assert payload.count(b"x" * size) == events


def test_a_client_that_falls_behind_is_not_taken_for_a_silent_upstream(tmp_path: Path) -> None:
    """The stream idle limit is about the upstream: waiting 1.5 s for a client that does
    not read (0.5 s limit) ends nothing."""
    events, size = 400, 16 * 1024
    url, _ = _sse_upstream(events=events, size=size, gap_s=0.0)
    cfg = {"tiers": [{"name": "up", "base_url": url}], "stream_idle_timeout_s": 0.5}
    with ProxyHarness(cfg, tmp_path) as px:
        host, port = px.url.removeprefix("http://").split(":")
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        client.connect((host, int(port)))
        body = b'{"model": "m", "prompt": "hi", "stream": true}'
        client.sendall(
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
        )
        time.sleep(1.5)
        received = bytearray()
        client.settimeout(20)
        while chunk := client.recv(1 << 20):
            received += chunk
        client.close()
        payload = dechunk(bytes(received).partition(b"\r\n\r\n")[2])
        assert _numbers(payload.decode()) == [*range(events), "[DONE]"]
        assert px.metric("sentinel_proxy_stream_idle_timeouts_total", tier="up") in (None, 0.0)


def _counting_upstream(events: int, size: int) -> tuple[str, threading.Thread, list[int]]:
    """A stream of ``events`` numbered events sent as fast as the proxy takes them, until
    the proxy cuts the connection; ``sent[0]`` counts the events sent so far."""
    srv = socket.create_server(("127.0.0.1", free_port()))
    sent = [0]

    def serve() -> None:
        conn = accept_sse(srv)
        try:
            for i in range(events):
                conn.sendall(sse_chunk(_event(i, size)))
                sent[0] += 1
            conn.sendall(sse_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        except OSError:
            pass  # cut by the proxy
        finally:
            conn.close()
            srv.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return f"http://127.0.0.1:{srv.getsockname()[1]}", t, sent


def _records(px: ProxyHarness) -> list[dict[str, Any]]:
    assert px.service is not None and px.service.payloads is not None
    px.service.payloads.flush()
    out = []
    for f in sorted(Path(px.payload_cfg.dir).glob("*.jsonl")):
        out += [json.loads(line) for line in f.read_text().splitlines() if line]
    return out


def test_a_client_that_leaves_mid_stream_stops_the_upstream_at_its_next_event(
    harness_for: Callable[[str], ProxyHarness],
) -> None:
    """A client stops reading, then leaves (its FIN arrives while Sentinel still holds
    bytes for it, so its connection is only closing): the upstream request is cut at
    once. Counted in events, not wall time: Sentinel takes at most one more event from
    the upstream than the upstream had sent when the client left."""
    events, size = 2000, 32 * 1024  # 64 MiB, far more than the socket buffers hold
    url, upstream, sent = _counting_upstream(events, size)
    px = harness_for(url)
    host, port = px.url.removeprefix("http://").split(":")
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    client.connect((host, int(port)))
    body = b'{"model": "m", "prompt": "hi", "stream": true}'
    client.sendall(
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nx-request-id: leaver\r\n\r\n%s" % (len(body), body)
    )
    client.settimeout(10)
    assert client.recv(4096).startswith(b"HTTP/1.1 200")
    assert px.service is not None
    server = px.service.server

    def client_behind() -> bool:
        return any(c.write_paused for c in server.connections)

    wait_for(lambda: px.call(client_behind), 10, what="the client's transport paused")
    at_leave = sent[0]  # all Sentinel can have taken from the upstream so far
    client.shutdown(socket.SHUT_WR)  # the client leaves, with bytes still unsent to it

    def record() -> dict[str, Any] | None:
        return next((r for r in _records(px) if r["request_id"] == "leaver"), None)

    rec = wait_for(record, 10, what="the stream's record")
    upstream.join(10)
    client.close()
    assert rec["client_disconnect"] is True
    relayed = rec["completion_tokens"] + 1  # events taken from the upstream and relayed
    assert relayed <= at_leave + 1, (relayed, at_leave)
    assert sent[0] < events  # the upstream request was cut, not streamed to its end
    assert px.call(lambda: px.service.in_flight) == 0


def _sse_events(text: str) -> list[str]:
    """The data of each event a WHATWG SSE parser dispatches (a blank line ends one)."""
    events: list[str] = []
    data: list[str] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if line == "":
            if data:
                events.append("\n".join(data))
            data = []
        elif line.startswith("data:"):
            data.append(line[5:].lstrip(" "))
    return events


@pytest.mark.parametrize("how", ["reset", "idle"])
def test_an_upstream_that_breaks_off_mid_event_still_ends_with_a_parseable_error_event(
    how: str, tmp_path: Path
) -> None:
    """The upstream stops in the middle of an event (it closes, or goes silent past
    stream_idle_timeout_s): the error event is an event of its own, not glued onto the
    partial one."""
    srv = socket.create_server(("127.0.0.1", free_port()))
    gone = threading.Event()

    def serve() -> None:
        conn = accept_sse(srv)
        conn.sendall(sse_chunk(b'data: {"choices": [{"text": "hi"}]}\n\n'))
        time.sleep(0.05)
        conn.sendall(sse_chunk(b'data: {"choices": [{"te'))
        if how == "idle":
            gone.wait(10)
        else:
            time.sleep(0.1)
        conn.close()
        srv.close()

    threading.Thread(target=serve, daemon=True).start()
    url = f"http://127.0.0.1:{srv.getsockname()[1]}"
    cfg = {"tiers": [{"name": "up", "base_url": url}], "stream_idle_timeout_s": 0.5}
    try:
        with ProxyHarness(cfg, tmp_path) as px:
            r = httpx.post(px.url + "/v1/completions", json=BODY, timeout=10)
    finally:
        gone.set()
    assert r.status_code == 200
    events = _sse_events(r.text)
    assert events[0] == '{"choices": [{"text": "hi"}]}'
    err = json.loads(events[-1])  # the last event parses: the error
    code = "reset" if how == "reset" else "stream_idle_timeout"
    assert err["error"]["code"] == code, r.text
    assert len(events) == 3  # the partial event is dispatched on its own, before it
