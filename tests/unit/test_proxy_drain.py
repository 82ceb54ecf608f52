"""The proxy's drain gate (issue 16): new requests refused (503 + Retry-After, naming the
drain) or sent to the next tier; requests in flight finish; ``wait_idle`` sees them go."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx

from sentinel.state import DrainInfo
from tests.fake_openai import FakeOpenAI
from tests.unit.proxy_harness import ProxyHarness

BODY = {"model": "m", "prompt": "hi", "max_tokens": 3}


def _slow_requests(px: ProxyHarness, n: int, delay: float, out: list) -> list[threading.Thread]:
    def one() -> None:
        r = httpx.post(
            px.url + "/v1/completions",
            json=BODY,
            headers={"x-fake-delay": str(delay)},
            timeout=30,
        )
        out.append(r.status_code)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def _wait_idle(px: ProxyHarness, timeout: float) -> bool:
    assert px.service is not None
    fut = asyncio.run_coroutine_threadsafe(px.service.wait_idle(timeout), px.loop)
    return fut.result(timeout + 5)


def test_gate_refuses_new_requests_and_lets_accepted_ones_finish(
    a: FakeOpenAI, tmp_path: Path
) -> None:
    cfg = {"tiers": [{"name": "local", "kind": "local"}]}
    with ProxyHarness(cfg, tmp_path, engine_url=a.url) as px:
        assert px.service is not None
        done: list[int] = []
        threads = _slow_requests(px, 4, 1.0, done)
        deadline = time.monotonic() + 5
        while px.service.in_flight < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert px.service.in_flight == 4
        px.call(px.service.begin_drain, 2.5, False)
        r = httpx.post(px.url + "/v1/completions", json=BODY, timeout=5)
        assert r.status_code == 503
        assert r.headers["retry-after"] == "3"
        err = r.json()["error"]
        assert err["code"] == "draining" and "draining" in err["message"]
        assert _wait_idle(px, 10) is True
        for t in threads:
            t.join(10)
        assert done == [200, 200, 200, 200]
        assert px.service.in_flight == 0
        px.call(px.service.end_drain)
        assert httpx.post(px.url + "/v1/completions", json=BODY, timeout=5).status_code == 200


def test_wait_idle_times_out_while_a_request_runs(a: FakeOpenAI, tmp_path: Path) -> None:
    cfg = {"tiers": [{"name": "local", "kind": "local"}]}
    with ProxyHarness(cfg, tmp_path, engine_url=a.url) as px:
        assert px.service is not None
        done: list[int] = []
        threads = _slow_requests(px, 1, 2.0, done)
        deadline = time.monotonic() + 5
        while px.service.in_flight < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        px.call(px.service.begin_drain, 1, False)
        t0 = time.monotonic()
        assert _wait_idle(px, 0.3) is False
        assert time.monotonic() - t0 < 1.5
        for t in threads:
            t.join(10)
        assert done == [200]


def test_fallback_sends_new_requests_to_the_next_tier(
    a: FakeOpenAI, b: FakeOpenAI, tmp_path: Path
) -> None:
    cfg = {"tiers": [{"name": "local", "kind": "local"}, {"name": "b", "base_url": b.url}]}
    with ProxyHarness(cfg, tmp_path, engine_url=a.url) as px:
        assert px.service is not None
        done: list[int] = []
        threads = _slow_requests(px, 2, 1.0, done)
        deadline = time.monotonic() + 5
        while px.service.in_flight < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        px.call(px.status.set_drain, DrainInfo("restart", time.time(), True, True))
        px.call(px.service.begin_drain, 5, True)
        r = httpx.post(px.url + "/v1/completions", json=BODY, timeout=5)
        assert r.status_code == 200 and r.headers["x-sentinel-upstream"] == "b"
        assert r.headers["x-sentinel-fallbacks"] == "local=draining"
        assert _wait_idle(px, 10) is True  # the local tier's two finished
        for t in threads:
            t.join(10)
        assert done == [200, 200]
        assert len(a.requests) == 2
