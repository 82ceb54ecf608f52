"""A flood of failing requests with 4 MiB bodies against the payload log.

The payload log decides by itself which bodies it keeps (``PayloadLog.submit``), so
this drives it directly, on a running event loop, the way the proxy's record code
does: 2,000 failed records (errors and client disconnects), each with a 4 MiB request
and response body. What a user would notice: the event loop stalling (``/livez``
fails once its heartbeat is older than ``ops.livez_heartbeat_timeout_s``), the disk
budget overrun, records lost. The loop's worst lag is measured and printed.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from sentinel.config.schema import OpsConfig, PayloadLogConfig
from sentinel.payloads.log import PayloadLog, PayloadRecord
from sentinel.payloads.record import CLIP_MARGIN, Redactor, build_line

MiB = 1024 * 1024
N = 2000


def body(tag: bytes) -> bytes:
    # a secret at the head (must be redacted), filler, and one far beyond any cap
    return b'{"api_key": "sk-' + tag * 8 + b'", "x": "' + b"a" * (4 * MiB) + b'sk-LATESECRET"}'


def lines(d: Path) -> list[dict[str, Any]]:
    out = []
    for f in sorted(d.glob("payloads-*.jsonl")):
        out += [json.loads(x) for x in f.read_text().splitlines() if x]
    return out


def value(reg: CollectorRegistry, name: str, **labels: str) -> float:
    return reg.get_sample_value(name, labels) or 0.0


async def flood(log: PayloadLog, req: bytes, resp: bytes) -> float:
    """Submit N failed records at about 2,000 a second; returns the loop's worst lag."""
    worst = 0.0
    done = False

    async def ticker() -> None:
        nonlocal worst
        while not done:
            t = time.perf_counter()
            await asyncio.sleep(0.005)
            worst = max(worst, time.perf_counter() - t - 0.005)

    tick = asyncio.create_task(ticker())
    for i in range(N):
        meta = {"request_id": f"r{i}", "status": 502 if i % 2 else 499}
        if i % 2 == 0:
            meta["client_disconnect"] = True
        log.submit(PayloadRecord(meta, {"authorization": "Bearer x"}, req, resp, resp, False, True))
        if i % 10 == 9:
            await asyncio.sleep(0.005)
    # the writer drains while the loop keeps turning
    while log.pending:
        await asyncio.sleep(0.01)
    done = True
    await tick
    return worst


def test_a_flood_of_failing_4mib_records_keeps_the_loop_and_the_budget(tmp_path: Path) -> None:
    budget = 8 * MiB
    cfg = PayloadLogConfig(
        dir=tmp_path, max_file_bytes=MiB, max_total_bytes=budget, max_error_bodies_per_s=10
    )
    reg = CollectorRegistry()
    log = PayloadLog(cfg, reg)
    log.start()
    try:
        t0 = time.perf_counter()
        worst = asyncio.run(flood(log, body(b"REQ"), body(b"RESP")))
        took = time.perf_counter() - t0
    finally:
        log.stop()
    print(f"\n{N} failing 4 MiB records in {took:.2f}s; the loop's worst lag {worst * 1e3:.1f} ms")

    # the loop never stalled long enough for /livez to fail
    assert worst < OpsConfig().livez_heartbeat_timeout_s
    # the disk budget holds, on the disk itself
    on_disk = sum(f.stat().st_size for f in tmp_path.glob("payloads-*.jsonl"))
    assert on_disk <= budget
    # every record is kept (its metadata line); only a few keep bodies
    recs = lines(tmp_path)
    assert sorted(r["request_id"] for r in recs) == sorted(f"r{i}" for i in range(N))
    with_bodies = [r for r in recs if r.get("sampled")]
    assert 1 <= len(with_bodies) <= 10 + 10 * (took + 1)
    reasons = ("error_rate_cap", "bodies_queue_full", "error_sampled_out")
    dropped = {r: value(reg, "sentinel_payload_bodies_dropped_total", reason=r) for r in reasons}
    assert dropped["error_rate_cap"] > 0 and dropped["error_sampled_out"] == 0
    assert sum(dropped.values()) == N - len(with_bodies)
    # what was kept is capped and redacted; the late secret was cut before redaction
    for r in with_bodies:
        assert r["truncated"] is True
        assert len(json.dumps(r).encode()) <= cfg.max_record_bytes + 64
        assert "sk-REQ" not in r["request_body"] and "LATESECRET" not in r["request_body"]
        assert r["request_headers"]["authorization"] == "[REDACTED]"


def test_error_sample_rate_and_rate_cap(tmp_path: Path) -> None:
    now = [0.0]
    cfg = PayloadLogConfig(dir=tmp_path, error_sample_rate=0.5, max_error_bodies_per_s=2)
    reg = CollectorRegistry()
    rolls = iter([0.1, 0.9] * 50)  # every other failed record is sampled in
    log = PayloadLog(cfg, reg, rng=lambda: next(rolls), clock=lambda: now[0])
    for i in range(8):  # 4 sampled in: the bucket holds 2
        log.submit(
            PayloadRecord({"request_id": f"e{i}", "status": 500}, {}, b"q", b"r", None, False, True)
        )
    now[0] = 1.0  # a second later: 2 more tokens
    for i in range(4):
        log.submit(
            PayloadRecord({"request_id": f"f{i}", "status": 500}, {}, b"q", b"r", None, False, True)
        )
    # a successful sampled record is not subject to the error cap
    log.submit(
        PayloadRecord({"request_id": "ok", "status": 200}, {}, b"q", b"r", None, False, True)
    )
    log.start()
    log.stop()
    got = {r["request_id"]: r.get("sampled", False) for r in lines(tmp_path)}
    assert len(got) == 13
    assert sorted(k for k, v in got.items() if v) == ["e0", "e2", "f0", "f2", "ok"]
    assert value(reg, "sentinel_payload_bodies_dropped_total", reason="error_sampled_out") == 6
    assert value(reg, "sentinel_payload_bodies_dropped_total", reason="error_rate_cap") == 2


def test_redaction_runs_on_the_capped_body_only() -> None:
    seen: list[int] = []

    class Spy(Redactor):
        def text(self, text: str) -> str:
            seen.append(len(text))
            return super().text(text)

    big = body(b"X")
    line = build_line({"request_id": "r"}, {}, big, big, None, False, True, Spy([]), 65535)
    assert max(seen) <= 65535 + CLIP_MARGIN
    rec = json.loads(line)
    assert rec["truncated"] is True and "sk-X" not in rec["request_body"]
