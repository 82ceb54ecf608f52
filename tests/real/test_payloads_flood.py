"""A flood of failing 4 MiB requests through a real Sentinel (real engine behind it):
``/livez`` answers 200 throughout, the payload log stays within its disk budget, and
the bodies it did not keep are counted.

The requests fail whether or not the engine has loaded by then (503 while it loads, 404
for the unknown model once it serves), so the test does not wait for the engine.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.helpers import wait_for
from tests.real.conftest import SentinelFactory

pytestmark = pytest.mark.real

MiB = 1024 * 1024
N = 240
BUDGET = 8 * MiB


def metric(text: str, name: str, label: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and label in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_failing_4mib_flood_keeps_livez_and_the_budget(sentinel_factory: SentinelFactory) -> None:
    s = sentinel_factory(
        {
            "payload_log": {
                "max_file_bytes": MiB,
                "max_total_bytes": BUDGET,
                "max_error_bodies_per_s": 1,  # this machine sends ~2-10 a second
            }
        },
        name="flood",
    )

    def up() -> bool:
        try:
            return s.get("/livez").status_code == 200 and bool(
                httpx.get(s.proxy_url + "/v1/models", timeout=5).status_code
            )
        except httpx.HTTPError:
            return False

    wait_for(up, 120, interval=0.5, what="Sentinel's ops and proxy ports")
    livez: list[int] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            try:
                livez.append(s.get("/livez", timeout=2).status_code)
            except httpx.HTTPError as exc:
                livez.append(-1)
                print("livez:", exc)
            time.sleep(0.2)

    prompt = "a" * (4 * MiB - 1024)
    body = ('{"model": "no-such-model", "max_tokens": 1, "prompt": "' + prompt + '"}').encode()
    statuses: list[int] = []

    def send(_i: int) -> None:
        r = httpx.post(
            s.proxy_url + "/v1/completions",
            content=body,
            headers={"content-type": "application/json"},
            timeout=60,
        )
        statuses.append(r.status_code)

    watcher = threading.Thread(target=probe, daemon=True)
    watcher.start()
    t0 = time.monotonic()
    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(send, range(N)))
    finally:
        stop.set()
        watcher.join(5)
    took = time.monotonic() - t0
    print(f"\n{N} failing 4 MiB requests in {took:.1f}s; /livez answers: {len(livez)}")

    assert len(statuses) == N and all(code >= 400 for code in statuses), set(statuses)
    assert livez and all(code == 200 for code in livez), livez
    metrics = s.get("/metrics").text
    assert metric(metrics, "sentinel_payload_bodies_dropped_total", 'reason="error_rate_cap"') > 0

    def written() -> bool:
        text = s.get("/metrics").text
        return metric(text, "sentinel_payload_records_total", "kind=") >= N

    wait_for(written, 30, interval=0.5, what="every record written")
    on_disk = sum(f.stat().st_size for f in Path(s.config["payload_log"]["dir"]).glob("*.jsonl"))
    assert 0 < on_disk <= BUDGET
