"""The traffic port against hostile clients, with real vLLM as the local tier.

One Sentinel for the module (the local engine only; a short stream idle limit). Order
matters (pytest keeps file order): the tests that need a healthy engine come first;
the frozen engine (SIGSTOP of EngineCore and Worker mid-stream) comes last.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import dechunk, flood_header, wait_for
from tests.real.harness import SentinelProcess, engine_available

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(not engine_available(), reason="vLLM or the tiny model is not installed"),
]

IDLE_S = 3.0
BODY = {"model": "tiny", "prompt": "hi", "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def sp(sentinel_factory: Any) -> SentinelProcess:
    overrides: dict[str, Any] = {
        "proxy": {
            "stream_idle_timeout_s": IDLE_S,
            "tiers": [
                {
                    "name": "local",
                    "kind": "local",
                    "timeouts": {"connect_s": 1.0, "first_byte_s": 30.0, "total_s": 60},
                }
            ],
        },
        "payload_log": {"sample_rate": 1.0},
    }
    s: SentinelProcess = sentinel_factory(overrides, name="traffic")
    s.wait_serving()
    wait_for(lambda: _post(s, BODY).status_code == 200, 120, interval=1, what="proxy serving")
    return s


def _post(sp: SentinelProcess, body: dict[str, Any], timeout: float = 30) -> httpx.Response:
    return httpx.post(sp.proxy_url + "/v1/completions", json=body, timeout=timeout)


def _connect(sp: SentinelProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", sp.config["proxy"]["port"]), timeout=10)


def _metric(sp: SentinelProcess, series: str) -> float | None:
    for line in sp.get("/metrics").text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def _records(sp: SentinelProcess) -> list[dict[str, Any]]:
    out = []
    for f in sorted(Path(sp.config["payload_log"]["dir"]).glob("*.jsonl")):
        out += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return out


def _raw_post(body: bytes, rid: str) -> bytes:
    return (
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"x-request-id: %s\r\ncontent-length: %d\r\n\r\n%s" % (rid.encode(), len(body), body)
    )


def _read_response(s: socket.socket, buf: bytes = b"") -> tuple[bytes, bytes, bytes]:
    """One response with a content-length: head, body, and what followed."""
    while b"\r\n\r\n" not in buf:
        buf += s.recv(65536)
    head, _, rest = buf.partition(b"\r\n\r\n")
    size = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(rest) < size:
        rest += s.recv(65536)
    return head, rest[:size], rest[size:]


def test_an_endless_header_gets_431_within_1s_while_livez_answers(sp: SentinelProcess) -> None:
    """64 MiB of one header sent in 4 KiB writes: 431 within 1 s; /livez 200 throughout."""
    livez: list[int] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                livez.append(sp.get("/livez", timeout=2).status_code)
            except httpx.HTTPError:
                livez.append(0)
            time.sleep(0.05)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    s = _connect(sp)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\nx-junk: ")
    got, _, took = flood_header(s, timeout=10)
    s.close()
    time.sleep(0.3)
    stop.set()
    t.join(5)
    assert got.startswith(b"HTTP/1.1 431"), got[:200]
    assert took < 1.0, f"431 after {took:.2f} s"
    assert livez and set(livez) == {200}, livez
    assert _post(sp, BODY).status_code == 200


def test_200_slowloris_connections_do_not_stop_a_completion(sp: SentinelProcess) -> None:
    conns = []
    try:
        for i in range(200):
            c = _connect(sp)
            c.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\nx-slow-%d: " % i)
            conns.append(c)
        for c in conns:  # still trickling
            c.sendall(b"a")
        t0 = time.monotonic()
        r = _post(sp, BODY)
        took = time.monotonic() - t0
        assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None
        assert took < 1.0, f"completion took {took:.2f} s beside 200 slowloris connections"
        assert (_metric(sp, "sentinel_proxy_open_connections") or 0) >= 200
    finally:
        for c in conns:
            c.close()


def test_a_whole_request_then_only_the_next_ones_head_leaks_no_slot(sp: SentinelProcess) -> None:
    """A whole plus B's head; after A's answer, B's body: both answered and recorded, and
    the local tier's in-flight count returns to 0."""
    a = json.dumps(BODY).encode()
    b = _raw_post(json.dumps({**BODY, "max_tokens": 2}).encode(), "pipe-b-real")
    cut = b.index(b"\r\n\r\n") + 4
    s = _connect(sp)
    s.sendall(_raw_post(a, "pipe-a-real") + b[:cut])
    head_a, body_a, rest = _read_response(s)
    assert head_a.startswith(b"HTTP/1.1 200") and b"pipe-a-real" in head_a
    assert json.loads(body_a)["usage"]["completion_tokens"] == 4
    time.sleep(0.2)
    s.sendall(b[cut:])
    head_b, body_b, _ = _read_response(s, rest)
    assert head_b.startswith(b"HTTP/1.1 200") and b"pipe-b-real" in head_b
    s.close()
    series = 'sentinel_proxy_in_flight_requests{tier="local"}'
    wait_for(lambda: _metric(sp, series) == 0, 10, what="in flight back to 0")
    wait_for(
        lambda: {"pipe-a-real", "pipe-b-real"} <= {r["request_id"] for r in _records(sp)},
        10,
        what="both requests recorded",
    )


def test_a_secret_named_object_in_a_body_never_reaches_the_payload_log(sp: SentinelProcess) -> None:
    """Secret-named members holding an object, an array or a number are masked whole in
    the recorded body, whatever the engine answers."""
    body = {
        **BODY,
        "api_key": {"value": "objsecret-0123456789"},
        "authorization": ["Bearer arrsecret-x", "tok-in-array-42"],
        "client_secret": 987654321987,
    }
    s = _connect(sp)
    s.sendall(_raw_post(json.dumps(body).encode(), "redact-obj-real"))
    head, _, _ = _read_response(s)
    s.close()
    assert head.split(b" ")[1] in (b"200", b"400"), head
    wait_for(
        lambda: any(r["request_id"] == "redact-obj-real" for r in _records(sp)),
        15,
        what="the request recorded",
    )
    (rec,) = [r for r in _records(sp) if r["request_id"] == "redact-obj-real"]
    text = json.dumps(rec)
    for secret in ("objsecret", "arrsecret", "tok-in-array", "987654321987"):
        assert secret not in text, text
    recorded = json.loads(rec["request_body"])
    assert recorded["api_key"] == recorded["authorization"] == "[REDACTED]"
    assert recorded["client_secret"] == "[REDACTED]" and recorded["prompt"] == BODY["prompt"]


@pytest.mark.parametrize(
    "target", ["/v1/../v1/completions", "/v1/%2e%2e/v1/completions", "/v1/chat%2Fcompletions"]
)
def test_dot_segments_and_encoded_slashes_never_reach_the_engine(
    sp: SentinelProcess, target: str
) -> None:
    before = _metric(sp, 'sentinel_proxy_requests_total{tier="local",status="200"}') or 0
    s = _connect(sp)
    body = json.dumps(BODY).encode()
    s.sendall(
        b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s"
        % (target.encode(), len(body), body)
    )
    head, payload, _ = _read_response(s)
    s.close()
    assert head.startswith(b"HTTP/1.1 400")
    assert json.loads(payload)["error"]["code"] == "invalid_path"
    assert (_metric(sp, 'sentinel_proxy_requests_total{tier="local",status="200"}') or 0) == before


def test_json_100000_deep_gets_an_openai_400_not_a_500(sp: SentinelProcess) -> None:
    body = b'{"model": "tiny", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = httpx.post(
        sp.proxy_url + "/v1/completions",
        content=body,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "json_too_deep"
    assert "RecursionError" not in sp.log_text()
    assert _post(sp, BODY).status_code == 200


def test_files_and_batches_are_not_forwarded(sp: SentinelProcess) -> None:
    for path in ("/v1/files", "/v1/batches"):
        r = httpx.post(sp.proxy_url + path, json={"model": "tiny"}, timeout=10)
        assert r.status_code == 404 and r.json()["error"]["code"] == "endpoint_not_allowed"


def test_a_slow_client_gets_every_byte_of_a_stream_in_order(sp: SentinelProcess) -> None:
    """A client with a small receive buffer that reads a 240-token stream in small sips,
    slower than the engine writes it, gets the same text as the whole answer, every
    event in order, ended by ``[DONE]``, and no error event. (Sentinel's own waiting on
    a slow client, back-pressure, is proven in tests/unit/test_proxy_stream_relay.py:
    on loopback the kernel's socket buffers hold far more than the tiny model writes.)"""
    body = {**BODY, "max_tokens": 240, "ignore_eos": True}
    whole = _post(sp, body, timeout=60)
    assert whole.status_code == 200, whole.text
    expected = whole.json()["choices"][0]["text"]
    raw = json.dumps({**body, "stream": True}).encode()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(30)
    s.connect(("127.0.0.1", sp.config["proxy"]["port"]))
    got = bytearray()
    with s:
        s.sendall(
            _raw_post(raw, "slow-reader").replace(
                b"host: x\r\n", b"host: x\r\nconnection: close\r\n"
            )
        )
        while part := s.recv(512):
            got += part
            time.sleep(0.02)
    head, _, chunked = bytes(got).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    events = [
        line.removeprefix(b"data: ")
        for line in dechunk(chunked).split(b"\n")
        if line.startswith(b"data: ")
    ]
    assert events[-1] == b"[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert not any("error" in c for c in chunks), chunks[-2:]
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected


def _pids(sp: SentinelProcess, roles: tuple[str, ...]) -> list[int]:
    by_role = sp.engine_processes_by_role()
    return [p.pid for role in roles for p in by_role.get(role, [])]


def test_a_frozen_engine_mid_stream_ends_the_stream_with_an_sse_error(sp: SentinelProcess) -> None:
    """SIGSTOP of the engine after the first tokens: the client gets a parseable SSE error
    event about IDLE_S later, the idle timeout is counted, and it feeds stall detection
    (readiness fails on ``progress``: ``stream_stalled``). The API server is stopped
    with EngineCore and Worker: on this CPU the tiny model generates a whole answer
    (240 tokens) in about 0.1 s, ahead of the API server's streaming, so with only
    EngineCore and Worker stopped the API server would still send what they made. Even
    so, on a busy machine the whole answer can reach the client's socket before the
    signal lands: such a stream was never frozen (it ends with [DONE]), and a new one is
    tried, up to 5; what is asserted is asserted once, on the stream that was frozen."""
    pids = _pids(sp, ("api_server", "engine_core", "worker"))
    assert len(pids) >= 3, sp.engine_processes_by_role()
    # with the top-20 logprobs of each token the API server spends 1-1.5 s streaming
    # what the engine computes in ~0.1 s (0.0-0.6 s without: under load it wrote all 241
    # events at once, and five streams in a row reached the client whole on the busy
    # 2-core machine); the API server is stopped first, so it writes nothing more
    body = {**BODY, "max_tokens": 240, "ignore_eos": True, "stream": True, "logprobs": 20}
    tries = 0
    readyz: dict[str, Any] = {}
    while True:
        tries += 1
        events: list[str] = []
        stopped_at: float | None = None
        try:
            with httpx.stream("POST", sp.proxy_url + "/v1/completions", json=body, timeout=60) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    events.append(line)
                    if stopped_at is None:
                        for pid in pids:
                            os.kill(pid, signal.SIGSTOP)
                        stopped_at = time.monotonic()
            ended = time.monotonic()
            if "data: [DONE]" not in events:  # frozen: what /readyz says before SIGCONT
                readyz = sp.get("/readyz").json()
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        if "data: [DONE]" not in events or tries == 5:
            break
    assert "data: [DONE]" not in events, f"5 streams ended before the freeze: {len(events)}"
    assert stopped_at is not None
    last = json.loads(events[-1].removeprefix("data: "))
    assert last["error"]["code"] == "stream_idle_timeout", events[-3:]
    assert "stream_idle_timeout_s" in last["error"]["message"], last
    # the idle clock starts at the last part Sentinel received, which on a busy machine can
    # be well before this process got round to the signal (2.4 s after it, seen, for a 3 s
    # limit): only the upper bound says something (not the 60 s total limit)
    assert ended - stopped_at <= IDLE_S + 5, ended - stopped_at
    print(f"frozen stream ended {ended - stopped_at:.2f} s after the signal (limit {IDLE_S:g} s)")
    assert _metric(sp, 'sentinel_proxy_stream_idle_timeouts_total{tier="local"}') == 1
    # issue 15: the idle stream fed stall detection, long before probes.stall_window_s
    # (30 s; and the frozen API server answers no scrape): stalled, not ready, counted
    assert "progress" in readyz["failed"], readyz
    assert "stream_stalled" in readyz["checks"]["progress"]["detail"], readyz
    assert _metric(sp, "sentinel_engine_stream_stalls_total") == 1
    wait_for(lambda: _post(sp, BODY, timeout=10).status_code == 200, 90, interval=1, what="serving")
