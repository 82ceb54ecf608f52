"""The traffic port's own HTTP/1.1 server (sentinel.http1) and request path, seen
from a client's socket: framing, pipelining order, 100-continue, large bodies,
disconnects, the limits a hostile client meets, path normalisation, the endpoint
allowlist, JSON depth, header policy, the stream idle limit and the drain interface."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fake_openai import FakeOpenAI
from tests.helpers import dechunk, flood_header, raw_server, wait_for
from tests.unit.proxy_harness import ProxyHarness

BODY = b'{"model": "m", "prompt": "hi", "max_tokens": 2}'


def post(
    body: bytes = BODY, rid: str = "", extra: bytes = b"", path: bytes = b"/v1/completions"
) -> bytes:
    rid_h = b"x-request-id: %s\r\n" % rid.encode() if rid else b""
    return (
        b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n%s%s\r\n%s" % (path, len(body), rid_h, extra, body)
    )


def connect(px: ProxyHarness, timeout: float = 10.0) -> socket.socket:
    host, port = px.url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=timeout)
    return s


def read_responses(s: socket.socket, n: int, timeout: float = 10.0) -> list[tuple[bytes, bytes]]:
    """Read ``n`` whole responses (content-length or chunked) off ``s``: (head, body)."""
    buf = b""
    out: list[tuple[bytes, bytes]] = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        while b"\r\n\r\n" not in buf:
            buf += _recv(s, deadline)
        head, _, buf = buf.partition(b"\r\n\r\n")
        if head.startswith(b"HTTP/1.1 100"):
            continue
        low = head.lower()
        if b"content-length:" in low:
            size = int(low.split(b"content-length:")[1].split(b"\r\n")[0])
            while len(buf) < size:
                buf += _recv(s, deadline)
            out.append((head, buf[:size]))
            buf = buf[size:]
        else:
            while not buf.endswith(b"0\r\n\r\n"):
                buf += _recv(s, deadline)
            out.append((head, dechunk(buf)))
            buf = b""
    return out


def _recv(s: socket.socket, deadline: float) -> bytes:
    s.settimeout(max(0.01, deadline - time.monotonic()))
    data = s.recv(65536)
    if not data:
        raise ConnectionError("closed by the proxy")
    return data


def read_all(s: socket.socket, timeout: float = 10.0) -> bytes:
    s.settimeout(timeout)
    out = b""
    try:
        while data := s.recv(65536):
            out += data
    except ConnectionResetError:
        pass
    return out


def header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == name:
            return v.strip()
    return None


@pytest.fixture(scope="module")
def up() -> Iterator[FakeOpenAI]:
    with FakeOpenAI("up") as a:
        yield a


LIMITS = {
    "max_request_line_bytes": 1024,
    "max_header_bytes": 4096,
    "max_headers": 20,
    "header_timeout_s": 0.5,
    "body_timeout_s": 0.5,
    "keepalive_timeout_s": 1.0,
    "max_connections": 64,
    "max_json_depth": 32,
}


@pytest.fixture(scope="module")
def px(up: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyHarness]:
    cfg = {"tiers": [{"name": "up", "base_url": up.url}], "limits": LIMITS}
    tmp = Path(tmp_path_factory.mktemp("http1"))
    with ProxyHarness(cfg, tmp, payload_log={"sample_rate": 1.0}) as h:
        yield h


def records(h: ProxyHarness) -> list[dict[str, Any]]:
    assert h.service is not None and h.service.payloads is not None
    h.service.payloads.flush()
    out = []
    for f in sorted(Path(h.payload_cfg.dir).glob("*.jsonl")):
        out += [json.loads(line) for line in f.read_text().splitlines() if line]
    return out


# ---- framing, pipelining, bodies ---------------------------------------------------------
def test_pipelined_requests_are_answered_in_order(px: ProxyHarness, up: FakeOpenAI) -> None:
    s = connect(px)
    slow = post(rid="p-1", extra=b"x-fake-delay: 0.3\r\n")
    s.sendall(slow + post(rid="p-2") + post(rid="p-3"))
    got = read_responses(s, 3)
    assert [header(h, b"x-request-id") for h, _ in got] == [b"p-1", b"p-2", b"p-3"]
    assert all(h.startswith(b"HTTP/1.1 200") for h, _ in got)
    s.close()


def test_a_request_answered_while_the_next_has_only_its_head_leaks_nothing(
    px: ProxyHarness,
) -> None:
    """A whole, then B's head only, then (after A's answer) B's body: both answered,
    both recorded, nothing left in flight."""
    s = connect(px)
    b = post(rid="pipe-b")
    cut = b.index(b"\r\n\r\n") + 4
    s.sendall(post(rid="pipe-a") + b[:cut])
    ((head_a, _),) = read_responses(s, 1)
    assert header(head_a, b"x-request-id") == b"pipe-a"
    time.sleep(0.1)
    s.sendall(b[cut:])
    ((head_b, _),) = read_responses(s, 1)
    assert header(head_b, b"x-request-id") == b"pipe-b" and head_b.startswith(b"HTTP/1.1 200")
    s.close()
    assert px.service is not None
    wait_for(lambda: px.call(lambda: px.service.in_flight) == 0, 5, what="in flight back to 0")
    assert px.service.chain.tiers[0].in_use() == 0
    wait_for(
        lambda: {"pipe-a", "pipe-b"} <= {r["request_id"] for r in records(px)},
        5,
        what="both requests recorded",
    )


def test_100_continue_and_bodies_past_64_kib(px: ProxyHarness, up: FakeOpenAI) -> None:
    prompt = "y" * 300_000
    body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": 1}).encode()
    s = connect(px)
    head = post(body, extra=b"expect: 100-continue\r\n")
    s.sendall(head[: head.index(b"\r\n\r\n") + 4])
    s.settimeout(5)
    assert s.recv(100).startswith(b"HTTP/1.1 100 Continue")
    s.sendall(body)
    ((h, _),) = read_responses(s, 1)
    assert h.startswith(b"HTTP/1.1 200")
    assert up.requests[-1]["body"]["prompt"] == prompt
    s.close()


def test_a_client_asking_to_close_gets_its_answer_then_eof(px: ProxyHarness) -> None:
    s = connect(px)
    s.sendall(post(extra=b"connection: close\r\n"))
    data = read_all(s)
    assert data.startswith(b"HTTP/1.1 200") and b"connection: close" in data.lower()
    s.close()


def test_an_http10_client_gets_a_stream_ended_by_the_close(px: ProxyHarness) -> None:
    body = b'{"model": "m", "prompt": "hi", "max_tokens": 3, "stream": true}'
    s = connect(px)
    s.sendall(
        b"POST /v1/completions HTTP/1.0\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )
    data = read_all(s)
    head, _, payload = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding" not in head.lower()
    assert payload.count(b"data: ") == 4 and payload.endswith(b"data: [DONE]\n\n")
    s.close()


def test_an_http10_keep_alive_client_is_told_and_served_twice(px: ProxyHarness) -> None:
    """An HTTP/1.0 client keeps its connection only when the answer says so (``ab -k``)."""
    body = b'{"model": "m", "prompt": "hi", "max_tokens": 3}'
    req = (
        b"POST /v1/completions HTTP/1.0\r\nconnection: keep-alive\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    )
    s = connect(px)
    for _ in range(2):
        s.sendall(req)
        head, length, rest = b"", 0, b""
        while b"\r\n\r\n" not in rest:
            rest += s.recv(65536)
        head, _, rest = rest.partition(b"\r\n\r\n")
        lines = head.lower().split(b"\r\n")
        assert lines[0].startswith(b"http/1.1 200") and b"connection: keep-alive" in lines
        length = int(
            next(v for k, _, v in (x.partition(b": ") for x in lines) if k == b"content-length")
        )
        while len(rest) < length:
            rest += s.recv(65536)
        assert b'"choices"' in rest
    s.close()
    # "keep-alive, close": close wins, and the answer says so
    s = connect(px)
    s.sendall(req.replace(b"connection: keep-alive", b"connection: keep-alive, close"))
    data = read_all(s)
    assert data.startswith(b"HTTP/1.1 200") and b"connection: close" in data.lower()
    assert b"connection: keep-alive" not in data.lower()
    s.close()


def test_a_client_leaving_mid_stream_cancels_its_upstream_request(
    px: ProxyHarness, up: FakeOpenAI
) -> None:
    before = px.metric("sentinel_proxy_client_disconnects_total", tier="up") or 0
    body = b'{"model": "m", "prompt": "hi", "max_tokens": 50, "stream": true}'
    s = connect(px)
    s.sendall(post(body, extra=b"x-fake-chunk-interval: 0.1\r\n"))
    s.recv(100)
    wait_for(lambda: up.active == 1, 5, what="the upstream streaming")
    s.close()
    wait_for(lambda: up.active == 0, 5, what="the upstream request cancelled")
    wait_for(
        lambda: px.metric("sentinel_proxy_client_disconnects_total", tier="up") == before + 1,
        5,
        what="the disconnect counted",
    )
    assert px.service is not None and px.call(lambda: px.service.in_flight) == 0


# ---- limits ---------------------------------------------------------------------------------
def test_an_endless_header_gets_431_at_once_and_the_port_keeps_serving(px: ProxyHarness) -> None:
    """64 MiB of one header in 4 KiB writes: 431 long before the end (the rest is never
    read; tests/real/test_proxy_traffic.py holds it to 1 s)."""
    s = connect(px)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\nx-junk: ")
    got, sent, _ = flood_header(s, timeout=5)
    assert got.startswith(b"HTTP/1.1 431"), got[:200]
    assert sent < 16 * 1024 * 1024, f"{sent} bytes were sent before the 431 came back"
    assert b"max_header_bytes" in got
    s.close()
    assert httpx.post(px.url + "/v1/completions", content=BODY).status_code == 200
    assert (px.metric("sentinel_proxy_client_refusals_total", reason="header_too_large") or 0) >= 1


@pytest.mark.parametrize(
    "raw,status,code",
    [
        (b"GET /v1/models?" + b"q" * 2000 + b" HTTP/1.1\r\nhost: x\r\n\r\n", 414, "uri_too_long"),
        (
            b"GET /v1/models HTTP/1.1\r\n"
            + b"".join(b"x-h%d: 1\r\n" % i for i in range(30))
            + b"\r\n",
            431,
            "too_many_headers",
        ),
        (b"GET /v1/models HTTP/1.1\r\nhost: x\r\nbad header\r\n\r\n", 400, "bad_request"),
        (
            b"POST /v1/completions HTTP/1.1\r\ncontent-length: 99999999\r\n\r\n",
            413,
            "body_too_large",
        ),
    ],
    ids=["request_line", "header_count", "malformed", "declared_body"],
)
def test_framing_limits(px: ProxyHarness, raw: bytes, status: int, code: str) -> None:
    s = connect(px)
    s.sendall(raw)
    data = read_all(s)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d" % status), data[:200]
    assert json.loads(body)["error"]["code"] == code
    assert header(head, b"x-request-id")
    s.close()


@pytest.mark.parametrize(
    "raw,code",
    [
        (b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n", "header_timeout"),
        (b"POST /v1/completions HTTP/1.1\r\ncontent-length: 100\r\n\r\n{", "body_timeout"),
    ],
)
def test_slow_senders_get_408_and_the_connection_closes(
    px: ProxyHarness, raw: bytes, code: str
) -> None:
    s = connect(px)
    t0 = time.monotonic()
    s.sendall(raw)
    data = read_all(s, timeout=5)
    assert (
        data.startswith(b"HTTP/1.1 408")
        and json.loads(data.partition(b"\r\n\r\n")[2])["error"]["code"] == code
    )
    assert time.monotonic() - t0 < 3
    s.close()


def test_an_idle_keepalive_connection_is_closed(px: ProxyHarness) -> None:
    s = connect(px)
    s.sendall(post())
    read_responses(s, 1)
    t0 = time.monotonic()
    assert read_all(s, timeout=5) == b""  # closed by the proxy, without a word
    assert 0.5 < time.monotonic() - t0 < 4
    s.close()


def test_connections_beyond_the_cap_are_closed_at_once(up: FakeOpenAI, tmp_path: Path) -> None:
    cfg = {"tiers": [{"name": "up", "base_url": up.url}], "limits": {"max_connections": 3}}
    with ProxyHarness(cfg, tmp_path) as h:
        held = [connect(h) for _ in range(3)]
        extra = connect(h)
        assert read_all(extra, timeout=5) == b""
        extra.close()
        wait_for(
            lambda: h.metric("sentinel_proxy_connections_refused_total") == 1, 5, what="counted"
        )
        held[0].close()
        wait_for(lambda: h.metric("sentinel_proxy_open_connections") == 2, 5, what="freed")
        assert httpx.post(h.url + "/v1/completions", content=BODY).status_code == 200
        for s in held[1:]:
            s.close()


# ---- paths, allowlist, JSON depth, headers ----------------------------------------------
@pytest.mark.parametrize(
    "path",
    [
        b"/v1/../v1/completions",
        b"/v1/%2e%2e/v1/completions",
        b"/v1/%2E%2e/x",
        b"/v1/./completions",
        b"/v1/chat%2Fcompletions",
        b"/v1/chat%5ccompletions",
        b"/v1//completions",
        b"/v1/completions%00",
        b"http://evil.example/v1/completions",
    ],
)
def test_paths_that_an_upstream_could_read_otherwise_get_400(
    px: ProxyHarness, up: FakeOpenAI, path: bytes
) -> None:
    before = len(up.requests)
    s = connect(px)
    s.sendall(post(path=path, extra=b"connection: close\r\n"))
    data = read_all(s)
    s.close()
    assert data.startswith(b"HTTP/1.1 400"), data[:200]
    assert json.loads(data.partition(b"\r\n\r\n")[2])["error"]["code"] in (
        "invalid_path",
        "bad_request",
    )
    assert len(up.requests) == before


@pytest.mark.parametrize("path", ["/v1/files", "/v1/batches", "/v1/fine_tuning/jobs"])
def test_endpoints_off_the_allowlist_reach_no_upstream(
    px: ProxyHarness, up: FakeOpenAI, path: str
) -> None:
    before = len(up.requests)
    r = httpx.post(px.url + path, json={"model": "m"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "endpoint_not_allowed"
    assert "proxy.allowed_endpoints" in r.json()["error"]["message"]
    assert len(up.requests) == before


def test_the_allowlist_is_configurable(up: FakeOpenAI, tmp_path: Path) -> None:
    cfg = {"tiers": [{"name": "up", "base_url": up.url}], "allowed_endpoints": ["/v1/files/*"]}
    with ProxyHarness(cfg, tmp_path) as h:
        assert httpx.get(h.url + "/v1/files/abc").status_code == 200
        assert up.requests[-1]["path"] == "/v1/files/abc"
        assert httpx.post(h.url + "/v1/completions", content=BODY).status_code == 404


@pytest.mark.parametrize("depth", [100_000, 1_000, 33])
def test_json_nested_beyond_the_limit_gets_an_openai_400(
    px: ProxyHarness, up: FakeOpenAI, depth: int
) -> None:
    before = len(up.requests)
    body = b'{"model": "m", "prompt": ' + b"[" * depth + b"]" * depth + b"}"
    r = httpx.post(px.url + "/v1/completions", content=body, timeout=30)
    assert r.status_code == 400, r.text[:300]
    err = r.json()["error"]
    assert err["code"] == "json_too_deep" and "max_json_depth" in err["message"]
    assert len(up.requests) == before
    ok = b'{"model": "m", "prompt": ' + b"[" * 20 + b"]" * 20 + b"}"
    assert httpx.post(px.url + "/v1/completions", content=ok).status_code == 200


def _header_answer(conn: socket.socket, _: threading.Event) -> None:
    """An upstream's answer carrying a session cookie and an organisation header."""
    conn.recv(65536)
    body = b'{"ok": true}'
    conn.sendall(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        b"set-cookie: session=secret\r\nopenai-organization: org-123\r\n"
        b"x-kept: yes\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
    )


def test_upstream_cookies_and_organisation_are_not_relayed(tmp_path: Path) -> None:
    with (
        raw_server(_header_answer) as url,
        ProxyHarness({"tiers": [{"name": "up", "base_url": url}]}, tmp_path) as h,
    ):
        r = httpx.post(h.url + "/v1/completions", content=BODY)
        assert r.status_code == 200 and r.headers["x-kept"] == "yes"
        assert "set-cookie" not in r.headers and "openai-organization" not in r.headers


# ---- streams ---------------------------------------------------------------------------------
def test_a_stream_that_goes_silent_ends_with_an_sse_error_event(
    up: FakeOpenAI, tmp_path: Path
) -> None:
    cfg = {"tiers": [{"name": "up", "base_url": up.url}], "stream_idle_timeout_s": 0.5}
    with ProxyHarness(cfg, tmp_path) as h:
        body = {"model": "m", "prompt": "hi", "max_tokens": 3, "stream": True}
        t0 = time.monotonic()
        with httpx.stream(
            "POST", h.url + "/v1/completions", json=body, headers={"x-fake-chunk-interval": "5"}
        ) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert time.monotonic() - t0 < 4
        last = json.loads(lines[-1].removeprefix("data: "))
        assert last["error"]["code"] == "stream_idle_timeout"
        assert "stream_idle_timeout_s" in last["error"]["message"]
        assert json.loads(lines[0].removeprefix("data: "))["object"] == "text_completion"
        assert h.metric("sentinel_proxy_stream_idle_timeouts_total", tier="up") == 1
        wait_for(lambda: up.active == 0, 5, what="the silent upstream request cancelled")


# ---- drain -----------------------------------------------------------------------------------
def test_drain_refuses_new_requests_and_lets_running_ones_finish(
    up: FakeOpenAI, tmp_path: Path
) -> None:
    with ProxyHarness({"tiers": [{"name": "up", "base_url": up.url}]}, tmp_path) as h:
        svc = h.service
        assert svc is not None
        out: list[httpx.Response] = []
        slow = threading.Thread(
            target=lambda: out.append(
                httpx.post(h.url + "/v1/completions", content=BODY, headers={"x-fake-delay": "0.8"})
            )
        )
        slow.start()
        wait_for(lambda: h.call(lambda: svc.in_flight) == 1, 5, what="one in flight")
        h.call(svc.begin_drain, 7.0, False)
        r = httpx.post(h.url + "/v1/completions", content=BODY)
        assert r.status_code == 503 and r.headers["retry-after"] == "7"
        assert r.json()["error"]["code"] == "draining"
        import asyncio

        idle = asyncio.run_coroutine_threadsafe(svc.wait_idle(5), h.loop).result(6)
        assert idle is True
        slow.join(5)
        assert out[0].status_code == 200  # the running request finished
        assert h.call(lambda: svc.in_flight) == 0
        h.call(svc.end_drain)
        assert httpx.post(h.url + "/v1/completions", content=BODY).status_code == 200


def test_wait_idle_times_out_while_requests_run(up: FakeOpenAI, tmp_path: Path) -> None:
    import asyncio

    with ProxyHarness({"tiers": [{"name": "up", "base_url": up.url}]}, tmp_path) as h:
        svc = h.service
        assert svc is not None
        t = threading.Thread(
            target=lambda: httpx.post(
                h.url + "/v1/completions", content=BODY, headers={"x-fake-delay": "1.5"}
            )
        )
        t.start()
        wait_for(lambda: h.call(lambda: svc.in_flight) == 1, 5, what="one in flight")
        assert asyncio.run_coroutine_threadsafe(svc.wait_idle(0.2), h.loop).result(5) is False
        t.join(5)


def test_drain_with_fallback_skips_the_local_tier(up: FakeOpenAI, tmp_path: Path) -> None:
    tiers = [{"name": "local", "kind": "local"}, {"name": "backup", "base_url": up.url}]
    with ProxyHarness({"tiers": tiers}, tmp_path, engine_url="http://127.0.0.1:9") as h:
        assert h.service is not None
        h.call(h.service.begin_drain, 3.0, True)
        r = httpx.post(h.url + "/v1/completions", content=BODY)
        assert r.status_code == 200 and r.headers["x-sentinel-upstream"] == "backup"
        assert r.headers["x-sentinel-fallbacks"] == "local=draining"


def test_a_handler_crash_is_a_500_and_logged_the_connection_survives_nothing_leaks(
    px: ProxyHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert px.service is not None
    policy = px.service.handler.policy

    def boom(*_: Any) -> Any:
        raise RuntimeError("a bug of ours")

    monkeypatch.setattr(policy, "proxy_request", boom)
    r = httpx.post(px.url + "/v1/completions", content=BODY)
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    monkeypatch.undo()
    assert httpx.post(px.url + "/v1/completions", content=BODY).status_code == 200
    assert px.call(lambda: px.service.in_flight) == 0


def test_client_credentials_reach_the_local_tier_only(up: FakeOpenAI, tmp_path: Path) -> None:
    secrets = {
        "authorization": "Bearer sk-client-1",
        "x-api-key": "sk-client-2",
        "api-key": "sk-client-3",
        "cookie": "session=abc",
    }
    with FakeOpenAI("local", model="m") as local:
        tiers = [{"name": "local", "kind": "local"}, {"name": "ext", "base_url": up.url}]
        with ProxyHarness({"tiers": tiers}, tmp_path, engine_url=local.url) as h:
            r = httpx.post(h.url + "/v1/completions", content=BODY, headers=secrets)
            assert r.headers["x-sentinel-upstream"] == "local"
            seen = local.requests[-1]["headers"]
            assert seen["authorization"] == "Bearer sk-client-1"
            assert not {"x-api-key", "api-key", "cookie"} & set(seen)
            local.mode["status"] = 503  # the local tier fails: the request goes on to ext
            r = httpx.post(h.url + "/v1/completions", content=BODY, headers=secrets)
            assert r.headers["x-sentinel-upstream"] == "ext"
            seen = up.requests[-1]["headers"]
            assert not set(secrets) & set(seen), seen


def test_the_client_key_check_runs_first_and_its_id_is_recorded(
    px: ProxyHarness, up: FakeOpenAI
) -> None:
    from sentinel.proxy.errors import ProxyError

    def check(headers: list[tuple[bytes, bytes]]) -> str:
        if (b"x-api-key", b"good") in headers:
            return "key-1"
        raise ProxyError(401, "Incorrect API key provided", "invalid_api_key")

    assert px.service is not None
    handler = px.service.handler
    px.call(setattr, handler, "authenticate", check)
    try:
        before = len(up.requests)
        r = httpx.post(
            px.url + "/v1/completions", content=b"{not json", headers={"x-api-key": "bad"}
        )
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert len(up.requests) == before
        r = httpx.post(
            px.url + "/v1/completions",
            content=BODY,
            headers={"x-api-key": "good", "x-request-id": "keyed-1"},
        )
        assert r.status_code == 200
        # (the record is made as the answer leaves: the client may be quicker)
        rec = wait_for(
            lambda: next((r for r in records(px) if r["request_id"] == "keyed-1"), None),
            5,
            what="the record",
        )
        assert rec["key_id"] == "key-1"
    finally:
        px.call(setattr, handler, "authenticate", None)


def test_a_client_that_pipelines_without_reading_gets_no_new_answers_made() -> None:
    """While answers wait unsent (the transport above its high-water mark), the next
    pipelined request is not handled; reading stops once 16 wait; all are answered, in
    order, once the client reads."""
    import asyncio

    from fuzz.request_path import FakeSocket, _Server
    from sentinel.http1.connection import MAX_PIPELINED, HttpConnection

    handled: list[bytes] = []

    async def handler(req: Any, resp: Any) -> None:
        handled.append(req.target)
        resp.whole(200, [], b"ok")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        conn = HttpConnection(_Server(handler, loop))  # type: ignore[arg-type]
        sock = FakeSocket()
        conn.connection_made(sock)  # type: ignore[arg-type]
        conn.data_received(b"GET /1 HTTP/1.1\r\n\r\n")
        await asyncio.sleep(0.01)
        conn.pause_writing()  # the client stopped reading
        reqs = b"".join(b"GET /%d HTTP/1.1\r\n\r\n" % i for i in range(2, 40))
        conn.data_received(reqs)
        await asyncio.sleep(0.01)
        assert handled == [b"/1"]
        assert not sock.reading and len(conn._queue) >= MAX_PIPELINED
        conn.resume_writing()
        for _ in range(200):
            await asyncio.sleep(0)
        assert handled == [b"/%d" % i for i in range(1, 40)]
        assert bytes(sock.out).count(b"HTTP/1.1 200 OK") == 39

    asyncio.run(main())
