"""The proxy and degradation chain with the real engine as the local tier.

One Sentinel for the module: tiers ``local`` (real vLLM), ``backup`` and ``external``
(small fake OpenAI servers on loopback, started here). Order matters (pytest keeps
file order): plain serving and bad input, client disconnect, the burst, client keys
and a stall of Sentinel's loop, SIGSTOP with the breaker, and last the SIGKILL under
load (the engine is left restarting).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fake_openai import FakeOpenAI
from tests.helpers import wait_for
from tests.real.harness import SentinelProcess, engine_available
from tests.unit.proxy_harness import ProxyHarness

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(not engine_available(), reason="vLLM or the tiny model is not installed"),
]

EXTERNAL_KEY = "sk-external-test-key-0123456789"
BREAKER = {"consecutive_failures": 2, "open_initial_s": 2.0, "open_max_s": 8.0}
ADMISSION = {"max_concurrency": 4, "queue_timeout_s": 1.0, "max_queue": 4}


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[SentinelProcess, FakeOpenAI, FakeOpenAI]]:
    backup = FakeOpenAI("backup", model="tiny").start()
    external = FakeOpenAI("external", model="gpt-x").start()
    os.environ["SENTINEL_TEST_EXTERNAL_KEY"] = EXTERNAL_KEY
    overrides: dict[str, Any] = {
        "supervisor": {"crash_loop_max_starts": 50},
        # a hung probe fails after 4 s: the proxy's own first-byte timeouts (1 s) open the
        # breaker first, so the SIGSTOP test sees both mechanisms
        "probes": {"interval_s": 1.0, "timeout_s": 4.0, "freshness_s": 8.0},
        "proxy": {
            "tiers": [
                {
                    "name": "local",
                    "kind": "local",
                    "timeouts": {"connect_s": 0.5, "first_byte_s": 1.0, "total_s": 60},
                },
                {"name": "backup", "base_url": backup.url, "max_concurrency": 2},
                {
                    "name": "external",
                    "base_url": external.url,
                    "max_concurrency": 2,
                    "api_key_env": "SENTINEL_TEST_EXTERNAL_KEY",
                    "model_map": {"tiny": "gpt-x"},
                },
            ],
            "breaker": BREAKER,
            "admission": ADMISSION,
            "auth": {"allow_anonymous": True},  # client keys: their own test below
        },
        "payload_log": {"sample_rate": 1.0},
    }
    sp = SentinelProcess(tmp_path_factory.mktemp("proxy"), overrides)
    sp.start()
    try:
        sp.wait_serving()  # the engine itself (the proxy would answer from the backup)
        wait_for(
            lambda: _served_by_local(sp),
            60,
            interval=0.5,
            what="the proxy to route to the local engine",
        )
        yield sp, backup, external
    finally:
        sp.stop()
        for pid in [p.pid for p in sp.engine_processes_anywhere()]:
            os.kill(pid, signal.SIGKILL)
        backup.stop()
        external.stop()


def _served_by_local(sp: SentinelProcess) -> bool:
    try:
        r = sp.complete(base=sp.proxy_url, max_tokens=2, timeout=10)
    except httpx.HTTPError:
        return False
    return r.status_code == 200 and r.headers.get("x-sentinel-upstream") == "local"


def _metric(sp: SentinelProcess, series: str) -> float | None:
    """The value of one series, given as ``name`` or ``name{a="x",b="y"}`` (any label order)."""
    from prometheus_client.parser import text_string_to_metric_families

    name, _, rest = series.partition("{")
    want = dict(kv.split("=", 1) for kv in rest.rstrip("}").split(",") if kv)
    want = {k: v.strip('"') for k, v in want.items()}
    for fam in text_string_to_metric_families(sp.get("/metrics").text):
        for sample in fam.samples:
            if sample.name == name and sample.labels == want:
                return float(sample.value)
    return None


def _engine_sum(sp: SentinelProcess, name: str) -> float:
    """The sum of one of the engine's own series over its label sets."""
    total = 0.0
    for line in httpx.get(sp.engine_url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _engine_running(sp: SentinelProcess) -> float:
    return _engine_sum(sp, "vllm:num_requests_running")


def _engine_pids(sp: SentinelProcess, roles: tuple[str, ...]) -> list[int]:
    by_role = sp.engine_processes_by_role()
    return [p.pid for role in roles for p in by_role.get(role, [])]


# ---- plain serving ----------------------------------------------------------------------
def test_proxies_the_openai_api_to_the_engine(stack: Any) -> None:
    sp, backup, _ = stack
    n_backup = len(backup.requests)
    with httpx.Client(base_url=sp.proxy_url, timeout=30) as c:
        r = c.post(
            "/v1/completions",
            json={"model": "tiny", "prompt": "hello", "max_tokens": 5, "ignore_eos": True},
            headers={"x-request-id": "real-1", "authorization": "Bearer sk-client-12345678"},
        )
        assert r.status_code == 200, r.text
        assert r.headers["x-request-id"] == "real-1"
        assert r.headers["x-sentinel-upstream"] == "local"
        assert r.headers["x-sentinel-fallback-hops"] == "0"
        assert r.json()["usage"]["completion_tokens"] == 5
        r = c.post(
            "/v1/chat/completions",
            json={
                "model": "tiny",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 3,
            },
        )
        assert r.status_code in (200, 400)  # the tiny model may lack a chat template
        assert r.headers["x-sentinel-upstream"] == "local"
        r = c.get("/v1/models")
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "tiny"
        events = []
        with c.stream(
            "POST",
            "/v1/completions",
            json={
                "model": "tiny",
                "prompt": "hi",
                "max_tokens": 12,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        ) as s:
            assert s.headers["content-type"].startswith("text/event-stream")
            reads = list(s.iter_raw())
        text = b"".join(reads).decode()
        events = [ln for ln in text.split("\n") if ln.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(ev[len("data: ") :]) for ev in events[:-1]]  # each event whole
        assert all(c["choices"][0]["index"] == 0 for c in chunks[:-1])
        assert chunks[-1]["usage"]["completion_tokens"] == 12  # all 12 tokens relayed
        # as the engine sends them, not one buffer (a busy engine merges tokens into fewer
        # events: one per token is not asserted)
        assert len(events) >= 3 and len(reads) >= 2
    assert len(backup.requests) == n_backup

    # the payload log: metadata with the engine's token counts, secrets redacted
    def record() -> dict[str, Any] | None:
        for f in (sp.tmp / "payloads").glob("payloads-*.jsonl"):
            for line in f.read_text().splitlines():
                rec = json.loads(line)
                if rec["request_id"] == "real-1":
                    return rec
        return None

    rec = wait_for(record, 10, what="the payload record of real-1")
    assert rec["tier"] == "local" and rec["status"] == 200
    assert rec["prompt_tokens"] >= 1 and rec["completion_tokens"] == 5
    assert rec["request_headers"]["authorization"] == "[REDACTED]"
    assert "sk-client-12345678" not in json.dumps(rec)


@pytest.mark.parametrize(
    "kwargs,status,code",
    [
        ({"content": b'{"model": "tiny", "prompt": '}, 400, "invalid_json"),
        ({"json": {"prompt": "hi"}}, 400, "missing_model"),
        ({"content": b'{"model": "tiny", "prompt": "\xff"}'}, 400, "invalid_utf8"),
        ({"json": {"model": "tiny", "prompt": "x" * (5 * 1024 * 1024)}}, 413, "body_too_large"),
    ],
    ids=["invalid_json", "missing_model", "invalid_utf8", "too_large"],
)
def test_bad_input_gets_openai_errors_and_sentinel_stays_up(
    stack: Any, kwargs: dict[str, Any], status: int, code: str
) -> None:
    sp, _, _ = stack
    r = httpx.post(sp.proxy_url + "/v1/completions", timeout=30, **kwargs)
    assert r.status_code == status and r.json()["error"]["code"] == code
    r = httpx.get(sp.proxy_url + "/metrics", timeout=5)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_path"
    assert _served_by_local(sp)


# ---- cancellation -------------------------------------------------------------------------
def test_client_disconnect_frees_the_engine_promptly(stack: Any) -> None:
    """The client leaves after the first token: its upstream request is cancelled and the
    engine stops computing it (not after the 64 x 240 tokens asked for). How fast is a
    wall-clock figure (about 0.1 s on a quiet machine; up to 0.7 s on the 2-core CI
    machine while the engine computes 64 sequences on both cores): printed, bounded only
    by the wait below, never judged against a tight limit here."""
    sp, _, _ = stack
    wait_for(lambda: _engine_running(sp) == 0, 20, interval=0.2, what="an idle engine")
    # a request first, so that an idle connection to the engine waits in the pool: the
    # stream then goes out on a reused keep-alive connection, and the disconnect must
    # still reach the engine through it
    warm = {"model": "tiny", "prompt": "hi", "max_tokens": 1}
    assert httpx.post(sp.proxy_url + "/v1/completions", json=warm, timeout=30).status_code == 200
    tokens0 = _engine_sum(sp, "vllm:generation_tokens_total")
    with httpx.stream(
        "POST",
        sp.proxy_url + "/v1/completions",
        timeout=30,
        json={
            "model": "tiny",
            "prompt": "once upon a time",
            "max_tokens": 240,
            "n": 64,  # 64 x 240 tokens: far longer than the checks below on the tiny model
            "ignore_eos": True,
            "stream": True,
        },
    ) as r:
        assert r.headers["x-sentinel-upstream"] == "local"
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # the first token is in: leave
    t0 = time.monotonic()  # the client is gone
    wait_for(
        lambda: _engine_running(sp) == 0,
        5,
        interval=0.05,
        what="vllm:num_requests_running back to 0",
    )
    print(f"engine freed {time.monotonic() - t0:.3f}s after the client left")
    # cancelled, not finished: fewer tokens generated than the 64 x 240 asked for (with
    # ignore_eos an uncancelled request makes all of them; the tiny model makes them in
    # about 1.5 s on both cores, so how many came before the cancel is a matter of time)
    time.sleep(1.0)
    generated = _engine_sum(sp, "vllm:generation_tokens_total") - tokens0
    assert generated < 64 * 240, generated


# ---- admission ----------------------------------------------------------------------------
def _burst(sp: SentinelProcess, n: int) -> tuple[list[httpx.Response], float, float | None]:
    """``n`` long streams sent at once; their answers, how many requests waited in the
    admission queue meanwhile, and the worst lag of Sentinel's own event loop (last 60 s)."""
    # start from an idle, ready engine whose breaker is closed
    wait_for(lambda: _engine_running(sp) == 0, 20, interval=0.2, what="an idle engine")
    wait_for(lambda: _served_by_local(sp), 30, interval=0.5, what="local serving")
    results: list[httpx.Response] = []
    lock = threading.Lock()
    go = threading.Barrier(n)

    def one() -> None:
        with httpx.Client(timeout=60) as c:
            go.wait(30)  # all at once
            # long streams hold the engine's slots (the first token comes fast, so no
            # first-byte timeout); x-fake-delay holds the fake tiers' slots
            r = c.post(
                sp.proxy_url + "/v1/completions",
                json={
                    "model": "tiny",
                    "prompt": "x",
                    "max_tokens": 240,
                    "n": 2,
                    "ignore_eos": True,
                    "stream": True,
                },
                headers={"x-fake-delay": "4"},
            )
        with lock:
            results.append(r)

    wait0 = _metric(sp, "sentinel_proxy_queue_wait_seconds_count") or 0
    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    lag = _metric(sp, "sentinel_event_loop_lag_max_seconds")
    waited = (_metric(sp, "sentinel_proxy_queue_wait_seconds_count") or 0) - wait0
    return results, waited, lag


def test_burst_beyond_capacity_is_queued_then_429_never_5xx(stack: Any) -> None:
    """40 long streams at once against 4 engine slots, a queue of 4 (1 s) and two small
    fake tiers: the overflow is queued in front of the engine, the rest 429, none 5xx.
    Once, with no rerun: a stall of Sentinel's own loop (seen in CI on a starved 2-core
    machine) does not fail the engine's connects or first bytes any more (the socket is
    read before a deadline fails a request), so requests queue as they should."""
    sp, backup, external = stack
    n = 40
    results, waited, lag = _burst(sp, n)
    codes = [r.status_code for r in results]
    hops_seen = sorted({r.headers.get("x-sentinel-fallbacks", "") for r in results})
    assert len(codes) == n, (codes, lag)
    odd = [
        (r.status_code, r.headers.get("x-sentinel-fallbacks"), r.text[:300])
        for r in results
        if r.status_code not in (200, 429)
    ]
    assert not odd, (codes, odd, lag)
    limited = [r for r in results if r.status_code == 429]
    assert limited, codes
    for r in limited:
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "capacity_exceeded"
        # every tier was tried or passed over first (full, or timing out under the burst)
        hops = r.headers["x-sentinel-fallbacks"]
        assert "backup=" in hops and "external=" in hops, hops
    served = {r.headers["x-sentinel-upstream"] for r in results if r.status_code == 200}
    assert served and served <= {"local", "backup", "external"}, served
    assert (_metric(sp, 'sentinel_proxy_rejected_total{reason="capacity"}') or 0) >= len(limited)
    # requests were queued in front of the local engine (the queue-wait histogram counts
    # them), and the loopback engine was never blamed for a connect
    assert waited >= 4, (waited, codes, hops_seen, lag)
    assert not any("local=connect_" in h for h in hops_seen), (hops_seen, lag)


# ---- client keys and Sentinel's own stalls, against the engine ------------------------------
def test_client_keys_401_reaches_no_engine_and_a_right_key_is_served(
    stack: Any, tmp_path: Path
) -> None:
    sp, _, _ = stack
    wait_for(lambda: _engine_running(sp) == 0, 20, interval=0.2, what="an idle engine")
    keys = tmp_path / "client-keys"
    keys.write_text("team-a:sk-team-a-0123456789abcdef\n")
    cfg = {"tiers": [{"name": "vllm", "base_url": sp.engine_url}], "auth": {"keys_file": keys}}
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 3}
    with ProxyHarness(cfg, tmp_path) as px, httpx.Client(base_url=px.url, timeout=30) as c:
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
        r = c.post(
            "/v1/completions", json=body, headers={"authorization": "Bearer sk-wrong-key-000"}
        )
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        # answered by Sentinel itself: nothing went to the engine (whose own counters also
        # see Sentinel's probes, so the proxy's are read)
        wait_for(
            lambda: px.metric("sentinel_proxy_requests_total", tier="none", status="401") == 2,
            10,
            what="both 401s recorded",
        )
        assert px.metric("sentinel_proxy_requests_total", tier="vllm", status="200") is None
        r = c.post(
            "/v1/completions", json=body, headers={"x-api-key": "sk-team-a-0123456789abcdef"}
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert r.headers["x-sentinel-upstream"] == "vllm"
        assert px.metric("sentinel_proxy_client_requests_total", client="team-a") == 1


def test_a_stall_of_sentinels_loop_is_not_blamed_on_the_engine(stack: Any, tmp_path: Path) -> None:
    """Sentinel's own loop blocked 1.5 s while the engine answers (first_byte_s 1 s): the
    answer that arrived meanwhile is taken; no fallback to the backup, no breaker
    failure (the cause of the burst test's old flakiness, CI's starved loop)."""
    sp, backup, _ = stack
    wait_for(lambda: _served_by_local(sp), 30, interval=0.5, what="local serving")
    timeouts = {"connect_s": 0.5, "first_byte_s": 1.0, "total_s": 30}
    cfg = {
        "tiers": [
            {"name": "vllm", "base_url": sp.engine_url, "timeouts": timeouts},
            {"name": "backup", "base_url": backup.url},
        ]
    }
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 3}
    for stream in (False, True):
        # a fresh proxy: no idle connection, so the request's task sends it and waits
        # for the first byte under the deadline (the path that failed)
        with ProxyHarness(cfg, tmp_path / str(stream)) as px:
            out: list[httpx.Response] = []

            def client(s: bool = stream, out: list[httpx.Response] = out) -> None:
                payload = {**body, "stream": s}
                out.append(httpx.post(px.url + "/v1/completions", json=payload, timeout=30))

            thread = threading.Thread(target=client)
            thread.start()
            time.sleep(0.2)  # the request is on its way to the engine
            px.call(time.sleep, 1.5)  # Sentinel's loop blocked while the engine answers
            thread.join(30)
            r = out[0]
            assert r.status_code == 200, r.text
            assert r.headers["x-sentinel-upstream"] == "vllm", r.headers
            assert r.headers["x-sentinel-fallback-hops"] == "0"
            assert px.metric("sentinel_proxy_breaker_state", upstream="vllm") == 0
            timeouts_seen = px.metric(
                "sentinel_proxy_fallbacks_total", tier="vllm", reason="first_byte_timeout"
            )
            assert timeouts_seen == 0  # the series exists from the start, at zero


# ---- health-aware chain and breaker ------------------------------------------------------------
def test_sigstopped_engine_backup_serves_within_3s_and_breaker_cycles(stack: Any) -> None:
    sp, backup, _ = stack
    wait_for(lambda: _served_by_local(sp), 30, interval=0.5, what="local serving")
    pids = _engine_pids(sp, ("engine_core", "worker"))
    assert len(pids) >= 2
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        hops = []
        for i in range(6):
            t0 = time.monotonic()
            body = {"model": "tiny", "prompt": "hi", "max_tokens": 4, "stream": i == 1}
            r = httpx.post(sp.proxy_url + "/v1/completions", json=body, timeout=30)
            took = time.monotonic() - t0
            assert r.status_code == 200, r.text
            assert r.headers["x-sentinel-upstream"] == "backup"
            assert took < 3.0, (i, took, r.headers.get("x-sentinel-fallbacks"))
            hops.append(r.headers["x-sentinel-fallbacks"])
            time.sleep(0.05)
        # two first-byte timeouts open the breaker; then local is skipped without waiting
        assert hops[:2] == ["local=first_byte_timeout"] * 2, hops
        assert hops[2] == "local=breaker_open", hops
        assert set(hops[2:]) <= {"local=breaker_open", "local=not_ready"}, hops
        opened = 'sentinel_proxy_breaker_transitions_total{upstream="local",state="open"}'
        assert (_metric(sp, opened) or 0) >= 1
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    # the engine recovers: after the open period a trial goes through and closes the breaker
    wait_for(lambda: _served_by_local(sp), 60, interval=0.5, what="local serving again")
    assert _metric(sp, 'sentinel_proxy_breaker_state{upstream="local"}') == 0
    assert (
        _metric(sp, 'sentinel_proxy_breaker_transitions_total{upstream="local",state="half_open"}')
        or 0
    ) >= 1
    assert (
        _metric(sp, 'sentinel_proxy_breaker_transitions_total{upstream="local",state="closed"}')
        or 0
    ) >= 1


def test_sigkilled_engine_under_load_no_client_request_fails(stack: Any) -> None:
    sp, backup, external = stack
    wait_for(lambda: _served_by_local(sp), 30, interval=0.5, what="local serving")
    failures: list[str] = []
    served: dict[str, int] = {}
    stop = threading.Event()
    lock = threading.Lock()

    def load() -> None:
        with httpx.Client(base_url=sp.proxy_url, timeout=30) as c:
            while not stop.is_set():
                try:
                    r = c.post(
                        "/v1/completions",
                        json={
                            "model": "tiny",
                            "prompt": "steady",
                            "max_tokens": 16,
                            "ignore_eos": True,
                        },
                    )
                except httpx.HTTPError as exc:
                    with lock:
                        failures.append(repr(exc))
                    continue
                with lock:
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text[:200]}")
                    else:
                        tier = r.headers["x-sentinel-upstream"]
                        served[tier] = served.get(tier, 0) + 1

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(3)
    before = dict(served)
    pids = _engine_pids(sp, ("api_server", "engine_core", "worker"))
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    time.sleep(6)
    stop.set()
    for t in threads:
        t.join(60)
    assert not failures, failures[:5]
    assert before.get("local", 0) > 0
    assert served.get("backup", 0) + served.get("external", 0) > 0, served
