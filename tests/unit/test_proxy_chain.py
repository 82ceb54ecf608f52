"""The proxy and its degradation chain against small fake OpenAI servers on loopback."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from sentinel.state import Lifecycle
from tests.fake_openai import FakeOpenAI
from tests.helpers import accept_sse, free_port, sse_chunk, wait_for
from tests.unit.proxy_harness import ProxyHarness

BODY = {"model": "m", "prompt": "hi", "max_tokens": 3}


def tiers(*fakes: FakeOpenAI | str, **extra: object) -> list[dict[str, object]]:
    out = []
    for f in fakes:
        url = f if isinstance(f, str) else f.url
        name = "dead" if isinstance(f, str) else f.name
        out.append({"name": name, "base_url": url, **extra})
    return out


def test_openai_paths_pass_through_with_identity_headers(a: FakeOpenAI, tmp_path: Path) -> None:
    with ProxyHarness({"tiers": tiers(a)}, tmp_path) as px:
        r = httpx.post(px.url + "/v1/completions", json=BODY, headers={"x-request-id": "abc-1"})
        assert r.status_code == 200 and r.json()["served_by"] == "a"
        assert r.headers["x-request-id"] == "abc-1"
        assert r.headers["x-sentinel-upstream"] == "a"
        assert r.headers["x-sentinel-fallback-hops"] == "0"
        assert a.requests[-1]["headers"]["x-request-id"] == "abc-1"
        r = httpx.post(
            px.url + "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
        )
        assert r.status_code == 200 and a.requests[-1]["path"] == "/v1/chat/completions"
        r = httpx.post(px.url + "/v1/embeddings", json={"model": "m", "input": "x"})
        assert r.json()["data"][0]["embedding"] == [0.1, 0.2]
        r = httpx.get(px.url + "/v1/models?limit=5")
        assert r.json()["data"][0]["id"] == "fake-model"
        assert r.headers["x-request-id"]  # made when the client sent none
        n = len(a.requests)  # a /v1 path off the allowlist (proxy.allowed_endpoints)
        r = httpx.post(px.url + "/v1/tokenize", json={"prompt": "x"})
        assert r.status_code == 404 and len(a.requests) == n


@pytest.mark.parametrize("failure", ["refused", "status_5xx", "status_429", "first_byte"])
def test_falls_back_before_first_byte(
    failure: str, a: FakeOpenAI, b: FakeOpenAI, tmp_path: Path
) -> None:
    first: FakeOpenAI | str = a
    headers = {}
    if failure == "refused":
        first = f"http://127.0.0.1:{free_port()}"
    elif failure == "status_5xx":
        a.mode["status"] = 503
    elif failure == "status_429":
        a.mode["status"] = 429
    else:
        headers["x-fake-delay"] = "2"  # b ignores it? no: per-request header reaches both
    tl = tiers(first, b, timeouts={"first_byte_s": 0.3, "connect_s": 0.5, "total_s": 10})
    with ProxyHarness({"tiers": tl}, tmp_path) as px:
        if failure == "first_byte":
            a.mode["delay"] = 2.0  # only a is slow
        t0 = time.monotonic()
        r = httpx.post(px.url + "/v1/completions", json=BODY, timeout=10)
        assert r.status_code == 200, r.text
        assert r.json()["served_by"] == "b"
        assert r.headers["x-sentinel-upstream"] == "b"
        assert r.headers["x-sentinel-fallback-hops"] == "1"
        reason = {"refused": "connect_error", "first_byte": "first_byte_timeout"}.get(
            failure, failure
        )
        name = "dead" if failure == "refused" else "a"
        assert r.headers["x-sentinel-fallbacks"] == f"{name}={reason}"
        assert time.monotonic() - t0 < 2.0
        assert px.metric("sentinel_proxy_fallbacks_total", tier=name, reason=reason) == 1


def test_client_errors_are_not_retried(a: FakeOpenAI, b: FakeOpenAI, tmp_path: Path) -> None:
    a.mode["status"] = 400
    with ProxyHarness({"tiers": tiers(a, b)}, tmp_path) as px:
        r = httpx.post(px.url + "/v1/completions", json=BODY)
        assert r.status_code == 400 and r.json()["error"]["message"] == "a says 400"
        assert not b.requests


def test_last_tier_error_is_relayed(a: FakeOpenAI, b: FakeOpenAI, tmp_path: Path) -> None:
    a.mode["status"] = 500
    b.mode["status"] = 502
    with ProxyHarness({"tiers": tiers(a, b)}, tmp_path) as px:
        r = httpx.post(px.url + "/v1/completions", json=BODY)
        assert r.status_code == 502 and r.json()["error"]["message"] == "b says 502"
        assert r.headers["x-sentinel-fallbacks"] == "a=status_5xx,b=status_5xx"


def test_all_unreachable_gives_openai_style_502(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with ProxyHarness({"tiers": tiers(dead)}, tmp_path) as px:
        r = httpx.post(px.url + "/v1/completions", json=BODY)
        assert r.status_code == 502
        assert r.json()["error"]["code"] == "upstream_error"


def test_local_tier_skipped_by_engine_state(a: FakeOpenAI, b: FakeOpenAI, tmp_path: Path) -> None:
    cfg = {"tiers": [{"name": "local", "kind": "local"}, {"name": "b", "base_url": b.url}]}
    with ProxyHarness(cfg, tmp_path, engine_url=a.url) as px:
        r = httpx.post(px.url + "/v1/completions", json=BODY)
        assert r.headers["x-sentinel-upstream"] == "local"
        px.call(px.status.set_readiness, False, {})
        r = httpx.post(px.url + "/v1/completions", json=BODY)
        assert r.headers["x-sentinel-upstream"] == "b"
        assert r.headers["x-sentinel-fallbacks"] == "local=not_ready"
        px.call(px.status.set_readiness, True, {})
        px.call(px.status.set_stalled, "no progress for 30 s")
        r = httpx.post(px.url + "/v1/completions", json=BODY)
        assert r.headers["x-sentinel-fallbacks"] == "local=stalled"
        px.call(px.status.set_stalled, None)
        px.call(px.status.set_lifecycle, Lifecycle.draining)
        r = httpx.post(px.url + "/v1/completions", json=BODY)
        assert r.headers["x-sentinel-fallbacks"] == "local=draining"
        px.call(px.status.set_lifecycle, Lifecycle.running)
        px.call(px.status.set_degraded, "gpu", "hot")  # not configured to skip: still local
        r = httpx.post(px.url + "/v1/completions", json=BODY)
        assert r.headers["x-sentinel-upstream"] == "local"
    # never a request to the engine while it was not usable
    assert len(a.requests) == 2


def test_degraded_skipped_where_configured(a: FakeOpenAI, b: FakeOpenAI, tmp_path: Path) -> None:
    cfg = {
        "tiers": [
            {"name": "local", "kind": "local", "skip_when_degraded": True},
            {"name": "b", "base_url": b.url},
        ]
    }
    with ProxyHarness(cfg, tmp_path, engine_url=a.url) as px:
        px.call(px.status.set_degraded, "gpu", "HW_THERMAL")
        r = httpx.post(px.url + "/v1/completions", json=BODY)
        assert r.headers["x-sentinel-fallbacks"] == "local=degraded"


def test_only_tier_not_ready_gives_503_with_retry_after(a: FakeOpenAI, tmp_path: Path) -> None:
    cfg = {"tiers": [{"name": "local", "kind": "local"}]}
    with ProxyHarness(cfg, tmp_path, engine_url=a.url) as px:
        px.call(px.status.set_readiness, False, {})
        r = httpx.post(px.url + "/v1/completions", json=BODY)
        assert r.status_code == 503 and "retry-after" in r.headers
        assert r.json()["error"]["code"] == "no_upstream_available"


def test_model_map_and_api_key_for_external_tier(
    a: FakeOpenAI, b: FakeOpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EXT_KEY", "sk-test-secret-0123456789")
    keyfile = tmp_path / "key"
    keyfile.write_text("sk-file-secret-9876543210\n")
    a.mode["status"] = 500
    cfg = {
        "tiers": [
            {"name": "local", "kind": "local"},
            {
                "name": "b",
                "base_url": b.url + "/",
                "api_key_env": "EXT_KEY",
                "model_map": {"m": "gpt-x"},
            },
        ],
        "auth": {"allow_anonymous": True},
    }
    with ProxyHarness(cfg, tmp_path, engine_url=a.url) as px:
        r = httpx.post(
            px.url + "/v1/completions",
            json=BODY,
            headers={"authorization": "Bearer client-key-abcdefgh"},
        )
        assert r.status_code == 200
    # the client's own key reaches the local engine only
    assert a.requests[-1]["headers"]["authorization"] == "Bearer client-key-abcdefgh"
    assert b.requests[-1]["body"]["model"] == "gpt-x"
    assert b.requests[-1]["headers"]["authorization"] == "Bearer sk-test-secret-0123456789"
    cfg["tiers"][1] = {"name": "b", "base_url": b.url, "api_key_file": str(keyfile)}
    with ProxyHarness(cfg, tmp_path / "2", engine_url=a.url) as px:
        httpx.post(px.url + "/v1/completions", json=BODY)
    assert b.requests[-1]["headers"]["authorization"] == "Bearer sk-file-secret-9876543210"
    # a non-local tier without its own key never sees the client's key
    cfg["tiers"][1] = {"name": "b", "base_url": b.url}
    with ProxyHarness(cfg, tmp_path / "3", engine_url=a.url) as px:
        httpx.post(
            px.url + "/v1/completions",
            json=BODY,
            headers={"authorization": "Bearer client-key-abcdefgh"},
        )
    assert "authorization" not in b.requests[-1]["headers"]


def test_streams_relay_every_event_and_fail_with_parseable_event(
    a: FakeOpenAI, b: FakeOpenAI, tmp_path: Path
) -> None:
    with ProxyHarness({"tiers": tiers(a, b)}, tmp_path) as px:
        body = {**BODY, "max_tokens": 20, "stream": True}
        with httpx.stream(
            "POST", px.url + "/v1/completions", json=body, headers={"x-fake-chunk-interval": "0.01"}
        ) as r:
            events = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
        assert len(events) == 21 and events[-1] == "data: [DONE]"
    # an upstream that dies mid-stream: the client gets an error event, no retry
    port = free_port()
    srv = socket.create_server(("127.0.0.1", port))

    def serve_half() -> None:
        conn = accept_sse(srv)
        conn.sendall(sse_chunk(b'data: {"choices":[{"text":"x"}]}\n\n'))
        time.sleep(0.2)
        conn.close()

    t = threading.Thread(target=serve_half, daemon=True)
    t.start()
    with ProxyHarness({"tiers": tiers(f"http://127.0.0.1:{port}", b)}, tmp_path / "2") as px:
        with httpx.stream("POST", px.url + "/v1/completions", json={**BODY, "stream": True}) as r:
            assert r.status_code == 200
            events = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    srv.close()
    assert len(events) == 2
    err = json.loads(events[-1][len("data: ") :])
    assert err["error"]["code"] == "reset" and "mid-stream" in err["error"]["message"]
    assert not b.requests  # never retried once streaming began


def test_breaker_opens_half_opens_and_closes(a: FakeOpenAI, b: FakeOpenAI, tmp_path: Path) -> None:
    cfg = {
        "tiers": tiers(a, b),
        "breaker": {"consecutive_failures": 2, "open_initial_s": 0.5, "open_max_s": 5},
    }
    a.mode["status"] = 500
    with ProxyHarness(cfg, tmp_path) as px:

        def post() -> httpx.Response:
            return httpx.post(px.url + "/v1/completions", json=BODY)

        for _ in range(2):
            assert post().headers["x-sentinel-fallbacks"] == "a=status_5xx"
        assert px.metric("sentinel_proxy_breaker_state", upstream="a") == 2
        n = len(a.requests)
        assert post().headers["x-sentinel-fallbacks"] == "a=breaker_open"
        assert len(a.requests) == n  # not even tried
        time.sleep(0.6)
        assert post().headers["x-sentinel-fallbacks"] == "a=status_5xx"  # the trial failed
        assert px.metric("sentinel_proxy_breaker_open_period_seconds", upstream="a") == 1.0
        assert (
            px.metric("sentinel_proxy_breaker_transitions_total", upstream="a", state="half_open")
            == 1
        )
        time.sleep(0.5)
        assert post().headers["x-sentinel-fallbacks"] == "a=breaker_open"  # longer this time
        a.mode["status"] = None
        time.sleep(0.6)
        r = post()
        assert r.headers["x-sentinel-upstream"] == "a"  # the trial succeeded: closed
        assert px.metric("sentinel_proxy_breaker_state", upstream="a") == 0
        assert post().headers["x-sentinel-upstream"] == "a"


def test_burst_beyond_capacity_queues_then_429(a: FakeOpenAI, tmp_path: Path) -> None:
    cfg = {
        "tiers": [{"name": "local", "kind": "local"}],
        "admission": {"max_concurrency": 2, "queue_timeout_s": 0.5, "max_queue": 3},
    }
    with ProxyHarness(cfg, tmp_path, engine_url=a.url) as px:
        results: list[httpx.Response] = []

        def one() -> None:
            results.append(
                httpx.post(
                    px.url + "/v1/completions",
                    json=BODY,
                    timeout=10,
                    headers={"x-fake-delay": "0.3"},
                )
            )

        threads = [threading.Thread(target=one) for _ in range(10)]
        for t in threads:
            t.start()
        wait_for(
            lambda: (px.metric("sentinel_proxy_queue_depth") or 0) >= 3,
            5,
            interval=0.01,
            what="queued requests",
        )
        for t in threads:
            t.join()
        codes = sorted(r.status_code for r in results)
        assert all(c in (200, 429) for c in codes), codes
        assert codes.count(200) >= 4  # 2 at once + queued ones served within the wait
        limited = [r for r in results if r.status_code == 429]
        assert limited and all(int(r.headers["retry-after"]) >= 1 for r in limited)
        assert limited[0].json()["error"]["code"] == "capacity_exceeded"
        assert px.metric("sentinel_proxy_queue_wait_seconds_count") >= 3
        assert a.active == 0


def test_spill_to_next_tier_when_engine_queue_is_long(
    a: FakeOpenAI, b: FakeOpenAI, tmp_path: Path
) -> None:
    cfg = {
        "tiers": [{"name": "local", "kind": "local"}, {"name": "b", "base_url": b.url}],
        "admission": {"spill_waiting_threshold": 4},
    }
    with ProxyHarness(cfg, tmp_path, engine_url=a.url) as px:
        px.call(px.status.set_engine_metrics, {"vllm:num_requests_waiting": 9.0})
        r = httpx.post(px.url + "/v1/completions", json=BODY)
        assert r.headers["x-sentinel-fallbacks"] == "local=spill"
        px.call(px.status.set_engine_metrics, {"vllm:num_requests_waiting": 1.0})
        r = httpx.post(px.url + "/v1/completions", json=BODY)
        assert r.headers["x-sentinel-upstream"] == "local"


def test_client_disconnect_cancels_upstream_at_once(a: FakeOpenAI, tmp_path: Path) -> None:
    with ProxyHarness({"tiers": tiers(a)}, tmp_path) as px:
        # streaming: leave after the first events
        with httpx.stream(
            "POST",
            px.url + "/v1/completions",
            json={**BODY, "max_tokens": 500, "stream": True},
            headers={"x-fake-chunk-interval": "0.05"},
        ) as r:
            it = r.iter_lines()
            next(it)
            assert a.active == 1
        t0 = time.monotonic()
        wait_for(lambda: a.active == 0, 2, interval=0.01, what="upstream request cancelled")
        assert time.monotonic() - t0 < 0.5
        # non-streaming: leave while the upstream is still working (on a connection idle
        # in the pool: the request was begun from the read that brought it)
        assert httpx.post(px.url + "/v1/completions", json=BODY).status_code == 200
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                px.url + "/v1/completions", json=BODY, timeout=0.3, headers={"x-fake-delay": "5"}
            )
        wait_for(lambda: a.active == 0, 1, interval=0.01, what="upstream request cancelled")
        assert px.metric("sentinel_proxy_client_disconnects_total", tier="a") == 1
        # no tier had answered the second one yet
        assert px.metric("sentinel_proxy_client_disconnects_total", tier="none") == 1
        # the proxy is fine afterwards
        assert httpx.post(px.url + "/v1/completions", json=BODY).status_code == 200


def test_request_time_limit_cancels(a: FakeOpenAI, tmp_path: Path) -> None:
    with ProxyHarness({"tiers": tiers(a), "request_timeout_s": 0.5}, tmp_path) as px:
        t0 = time.monotonic()
        r = httpx.post(
            px.url + "/v1/completions", json=BODY, headers={"x-fake-delay": "5"}, timeout=10
        )
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
        assert time.monotonic() - t0 < 1.5
        wait_for(lambda: a.active == 0, 1, interval=0.01, what="upstream request cancelled")
        with httpx.stream(
            "POST",
            px.url + "/v1/completions",
            json={**BODY, "max_tokens": 100, "stream": True},
            headers={"x-fake-chunk-interval": "0.05"},
        ) as r:
            events = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
        err = json.loads(events[-1][len("data: ") :])
        assert err["error"]["code"] == "timeout"
        assert len(events) < 20


def test_hop_by_hop_headers_of_an_upstream_are_not_relayed(tmp_path: Path) -> None:
    """Upgrade, Trailer, Proxy-Authenticate, TE, Proxy-Connection and whatever the
    upstream's Connection header names concern its hop only: the client gets none."""
    srv = socket.create_server(("127.0.0.1", free_port()))

    def serve() -> None:
        conn, _ = srv.accept()
        conn.recv(65536)
        conn.sendall(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nupgrade: h2c\r\n"
            b"trailer: x-t\r\nproxy-authenticate: Basic\r\nte: trailers\r\n"
            b"proxy-connection: keep-alive\r\nconnection: keep-alive, X-Hop-Secret\r\n"
            b"x-hop-secret: s3cret\r\nx-kept: yes\r\ncontent-length: 2\r\n\r\n{}"
        )
        time.sleep(0.5)
        conn.close()
        srv.close()

    threading.Thread(target=serve, daemon=True).start()
    url = f"http://127.0.0.1:{srv.getsockname()[1]}"
    with ProxyHarness({"tiers": tiers(url)}, tmp_path) as px:
        r = httpx.post(px.url + "/v1/completions", json=BODY)
    assert r.status_code == 200 and r.content == b"{}" and r.headers["x-kept"] == "yes"
    for name in ("upgrade", "trailer", "proxy-authenticate", "te", "proxy-connection"):
        assert name not in r.headers, name
    assert "x-hop-secret" not in r.headers
    assert r.headers.get("connection", "keep-alive") == "keep-alive"  # Sentinel's own
