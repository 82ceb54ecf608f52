"""The fast path: a request whose first tier can take it at once is sent upstream from
the read that brought it, and the upstream's answer goes to the client from the read
that brings it, without waiting for the request's task. Everything else (fallback,
timeouts, disconnects, records) behaves as on the task's path."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sentinel.proxy.server import InlineResponse
from tests.fake_openai import FakeOpenAI
from tests.helpers import wait_for
from tests.unit.proxy_harness import ProxyHarness, delay_request_tasks

BODY = {"model": "m", "prompt": "hi", "max_tokens": 3}
TASK_DELAY_S = 1.0


@pytest.fixture
def a() -> Iterator[FakeOpenAI]:
    with FakeOpenAI("a") as f:
        yield f


@pytest.fixture
def b() -> Iterator[FakeOpenAI]:
    with FakeOpenAI("b") as f:
        yield f


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
            assert first < TASK_DELAY_S / 2, f"first event took {first:.3f} s"
            assert len(events) == 6 and events[-1] == "data: [DONE]"
    assert slow_tasks["tasks"] == 3
    # the tasks still ran and recorded each request
    recs = {r["request_id"]: r for r in _records(px, 3)}
    assert recs["w1"]["status"] == 200 and recs["w1"]["tier"] == "a"
    assert recs["w1"]["ttft_s"] < TASK_DELAY_S / 2
    assert recs["s1"]["stream"] is True and recs["s1"]["completion_tokens"] == 5
    assert recs["s1"]["ttft_s"] < TASK_DELAY_S / 2
    assert px.metric("sentinel_proxy_requests_total", tier="a", status="200") == 3


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
    declined = {"n": 0}

    def never(self: InlineResponse) -> bool:
        declined["n"] += 1
        return False

    monkeypatch.setattr(InlineResponse, "ready", never)
    with ProxyHarness({"tiers": [{"name": "a", "base_url": a.url}]}, tmp_path) as px:
        with httpx.Client(timeout=10) as client:
            for _ in range(3):
                r = client.post(px.url + "/v1/completions", json=BODY)
                assert r.status_code == 200 and r.json()["served_by"] == "a"
                r = client.post(px.url + "/v1/completions", json={**BODY, "stream": True})
                events = [ln for ln in r.text.splitlines() if ln.startswith("data: ")]
                assert len(events) == 4 and events[-1] == "data: [DONE]"
    assert declined["n"] >= 4  # the warm requests went the fast path's way and let go


def test_a_client_gone_before_the_answer_cancels_the_begun_request(
    a: FakeOpenAI, tmp_path: Path
) -> None:
    with ProxyHarness({"tiers": [{"name": "a", "base_url": a.url}]}, tmp_path) as px:
        with httpx.Client(timeout=10) as client:
            assert client.post(px.url + "/v1/completions", json=BODY).status_code == 200
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                px.url + "/v1/completions", json=BODY, timeout=0.3, headers={"x-fake-delay": "5"}
            )
        wait_for(lambda: a.active == 0, 1, interval=0.01, what="upstream request cancelled")
        # no tier had answered yet
        assert px.metric("sentinel_proxy_client_disconnects_total", tier="none") == 1
        assert httpx.post(px.url + "/v1/completions", json=BODY).status_code == 200
