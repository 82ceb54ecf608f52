"""Sampled payload logging: sampling rate, redaction, size cap, disk budget, disk full,
queue full, and the metadata every proxied request leaves."""

from __future__ import annotations

import errno
import json
import math
import random
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO

import httpx
from prometheus_client import CollectorRegistry

from sentinel.config.schema import PayloadLogConfig
from sentinel.payloads.log import PayloadLog, PayloadRecord
from tests.fake_openai import FakeOpenAI
from tests.helpers import free_port
from tests.unit.proxy_harness import ProxyHarness


def records(d: Path) -> list[dict[str, Any]]:
    out = []
    for f in sorted(d.glob("payloads-*.jsonl")):
        out += [json.loads(line) for line in f.read_text().splitlines() if line]
    return out


def rec(
    i: int = 0,
    body: bytes = b'{"model":"m"}',
    with_bodies: bool = True,
    headers: dict[str, str] | None = None,
    resp: bytes = b'{"ok":true}',
) -> PayloadRecord:
    return PayloadRecord(
        {"request_id": f"r{i}", "status": 200}, headers or {}, body, resp, resp, False, with_bodies
    )


def make(tmp: Path, **cfg: Any) -> tuple[PayloadLog, CollectorRegistry]:
    reg = CollectorRegistry()
    log = PayloadLog(PayloadLogConfig(dir=tmp, **cfg), reg, **cfg.pop("_kw", {}))
    return log, reg


def test_sampling_rate_within_statistical_tolerance(tmp_path: Path) -> None:
    rng = random.Random(1234)
    log = PayloadLog(
        PayloadLogConfig(dir=tmp_path, sample_rate=0.05), CollectorRegistry(), rng=rng.random
    )
    n = 20000
    hits = sum(log.should_sample() for _ in range(n))
    sigma = math.sqrt(n * 0.05 * 0.95)
    assert abs(hits - n * 0.05) < 4 * sigma
    assert not any(
        PayloadLog(
            PayloadLogConfig(dir=tmp_path, sample_rate=0.0), CollectorRegistry()
        ).should_sample()
        for _ in range(1000)
    )


def test_redaction_of_headers_keys_and_patterns(tmp_path: Path) -> None:
    log, _ = make(tmp_path, redact_patterns=[r"SSN-\d{3}-\d{4}"])
    log.start()
    body = json.dumps(
        {
            "model": "m",
            "prompt": "my key is sk-abcdef0123456789 and SSN-123-4567",
            "api_key": "hunter2hunter2",
        }
    ).encode()
    log.submit(
        rec(
            body=body,
            headers={
                "authorization": "Bearer sk-live-0123456789abcdef",
                "x-api-key": "plainsecret",
                "user-agent": "t",
            },
        )
    )
    log.flush()
    log.stop()
    text = "".join(f.read_text() for f in tmp_path.glob("payloads-*.jsonl"))
    for secret in (
        "sk-abcdef0123456789",
        "SSN-123-4567",
        "sk-live-0123456789abcdef",
        "plainsecret",
        "hunter2hunter2",
    ):
        assert secret not in text
    r = records(tmp_path)[0]
    assert r["request_headers"]["authorization"] == "[REDACTED]"
    assert r["request_headers"]["x-api-key"] == "[REDACTED]"
    assert r["request_headers"]["user-agent"] == "t"
    assert "[REDACTED]" in r["request_body"]


def test_redaction_of_any_secret_named_header_and_member() -> None:
    from sentinel.payloads.record import Redactor

    r = Redactor([])
    headers = r.headers(
        {"X-Goog-Api-Key": "AIzaSy-secret-1", "X-Auth-Token": "tok-2", "OpenAI-Organization": "o"}
    )
    assert headers == {
        "X-Goog-Api-Key": "[REDACTED]",
        "X-Auth-Token": "[REDACTED]",
        "OpenAI-Organization": "o",
    }
    body = json.dumps(
        {
            "api_key": 'abc"SECRETTAIL-987654',  # an escaped quote inside the secret
            "credentials": "AKIAIOSFODNN7EXAMPLE",
            "aws_access_key": "wJalrXUtnFEMI/K7MDENG",
            "password": "ends with a backslash \\",
            "max_tokens": 5,
            "prompt": "hello",
        }
    )
    out = r.text(body)
    for secret in ("SECRETTAIL", "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI", "backslash"):
        assert secret not in out
    assert json.loads(out)["max_tokens"] == 5 and json.loads(out)["prompt"] == "hello"
    # a body cut inside the secret: the rest of it is masked too
    assert "supersecr" not in r.text('{"prompt": "x", "api_key": "supersecr')


def test_a_secret_named_member_is_masked_whatever_its_type() -> None:
    """An object, array, number or boolean under a secret-looking name is masked whole,
    cut bodies included; what follows it is kept."""
    from sentinel.payloads.record import Redactor

    r = Redactor([])
    body = json.dumps(
        {
            "api_key": {"value": "hunter2-object-secret", "nested": {"k": ["deep-secret-1"]}},
            "authorization": ["Bearer x", "tok-in-array"],
            "client_secret": 98765432101,
            "password": True,
            "extra": {"access_token": {"v": "inner-secret-2"}},
            "max_tokens": 5,
            "prompt": 'hello {not json] "quoted"',
        }
    )
    out = r.text(body)
    doc = json.loads(out)
    for secret in ("hunter2", "deep-secret", "Bearer x", "tok-in-array", "98765432101",
                   "inner-secret"):  # fmt: skip
        assert secret not in out, out
    assert doc["api_key"] == doc["authorization"] == doc["client_secret"] == "[REDACTED]"
    assert doc["password"] == "[REDACTED]" and doc["extra"]["access_token"] == "[REDACTED]"
    assert doc["max_tokens"] == 5 and doc["prompt"] == 'hello {not json] "quoted"'
    cut = r.text('{"prompt": "x", "token": {"value": "cut-in-the-middle-sec')
    assert "cut-in-the-middle" not in cut and cut.startswith('{"prompt": "x"')
    brackets = r.text('{"secret": ["a]b\\"}c", {"x": "]}"}], "n": 1}')
    assert json.loads(brackets) == {"secret": "[REDACTED]", "n": 1}


def test_record_size_cap(tmp_path: Path) -> None:
    log, reg = make(tmp_path, max_record_bytes=4096)
    log.start()
    big = json.dumps({"model": "m", "prompt": 'é"' * 100_000}).encode()
    log.submit(rec(body=big, resp=b"y" * 200_000))
    log.submit(rec(1))
    log.flush()
    log.stop()
    lines = (next(tmp_path.glob("payloads-*.jsonl"))).read_bytes().splitlines()
    assert all(len(line) + 1 <= 4096 for line in lines)
    first = json.loads(lines[0])
    assert first["truncated"] is True and first["request_body"].startswith('{"model"')
    assert "truncated" not in json.loads(lines[1])
    assert reg.get_sample_value("sentinel_payload_records_truncated_total") == 1


def test_rotation_under_total_disk_budget(tmp_path: Path) -> None:
    log, reg = make(tmp_path, max_file_bytes=2048, max_total_bytes=8192)
    log.start()
    for i in range(400):
        log.submit(rec(i, with_bodies=False))
    log.flush()
    log.stop()
    files = list(tmp_path.glob("payloads-*.jsonl"))
    total = sum(f.stat().st_size for f in files)
    assert 1 < len(files) <= 5 and total <= 8192
    assert all(f.stat().st_size <= 2048 for f in files)
    ids = [r["request_id"] for r in records(tmp_path)]
    assert ids[-1] == "r399"  # the newest are kept, the oldest deleted
    assert reg.get_sample_value("sentinel_payload_files_deleted_total") > 0
    assert reg.get_sample_value("sentinel_payload_records_total", {"kind": "metadata"}) == 400


class FullDisk:
    """A file whose writes fail with ENOSPC while ``full`` is set."""

    def __init__(self, path: Path, full: threading.Event) -> None:
        self.f = open(path, "ab")  # noqa: SIM115
        self.full = full

    def write(self, data: bytes) -> int:
        if self.full.is_set():
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def test_disk_full_drops_and_counts_then_recovers(tmp_path: Path) -> None:
    full = threading.Event()
    full.set()
    reg = CollectorRegistry()

    def opener(p: Path) -> BinaryIO:
        return FullDisk(p, full)  # type: ignore[return-value]

    log = PayloadLog(PayloadLogConfig(dir=tmp_path), reg, opener=opener)
    log.start()
    t0 = time.perf_counter()
    for i in range(100):
        log.submit(rec(i))
    assert time.perf_counter() - t0 < 0.5  # submit never waits on the disk
    log.flush()
    dropped = reg.get_sample_value(
        "sentinel_payload_records_dropped_total", {"reason": "write_error"}
    )
    assert dropped == 100
    full.clear()
    log.submit(rec(1000))
    log.flush()
    log.stop()
    assert [r["request_id"] for r in records(tmp_path)] == ["r1000"]


def test_queue_full_drops_without_blocking(tmp_path: Path) -> None:
    gate = threading.Event()
    reg = CollectorRegistry()

    def opener(p: Path) -> BinaryIO:
        gate.wait(10)  # the writer is stuck (a hung disk)
        return open(p, "ab")  # noqa: SIM115

    log = PayloadLog(PayloadLogConfig(dir=tmp_path), reg, opener=opener, queue_size=10)
    log.start()
    t0 = time.perf_counter()
    for i in range(100):
        log.submit(rec(i))
    assert time.perf_counter() - t0 < 0.5
    assert (
        reg.get_sample_value("sentinel_payload_records_dropped_total", {"reason": "queue_full"})
        >= 80
    )
    gate.set()
    log.flush()
    log.stop()


def test_proxied_requests_leave_metadata_and_samples(tmp_path: Path) -> None:
    with FakeOpenAI("b") as b:
        dead = f"http://127.0.0.1:{free_port()}"
        cfg = {"tiers": [{"name": "dead", "base_url": dead}, {"name": "b", "base_url": b.url}]}
        payload_log = {"sample_rate": 0.2}
        with ProxyHarness(cfg, tmp_path, payload_log=payload_log) as px:
            n = 400
            with httpx.Client() as c:
                for i in range(n):
                    r = c.post(
                        px.url + "/v1/completions",
                        json={"model": "m", "prompt": f"p{i}", "max_tokens": 2},
                        headers={"authorization": "Bearer sk-client-abcdefghijkl"},
                    )
                    assert r.status_code == 200
                r = c.post(
                    px.url + "/v1/completions",
                    json={"model": "m", "prompt": "s", "max_tokens": 5, "stream": True},
                )
                bad = c.post(px.url + "/v1/completions", content=b"{nope")
                assert bad.status_code == 400
            assert px.service is not None and px.service.payloads is not None
            px.service.payloads.flush()
            all_recs = records(tmp_path / "payloads")
    assert len(all_recs) == n + 2
    first = all_recs[0]
    for key in (
        "request_id",
        "tier",
        "upstream",
        "model",
        "status",
        "prompt_tokens",
        "completion_tokens",
        "ttft_s",
        "latency_s",
        "fallback_hops",
        "client_disconnect",
    ):
        assert key in first
    assert first["tier"] == "b" and first["upstream"] == b.url and first["model"] == "m"
    assert first["prompt_tokens"] == 3 and first["completion_tokens"] == 2
    assert first["fallback_hops"] == ["dead=connect_error"]
    assert first["client_disconnect"] is False and first["ttft_s"] <= first["latency_s"]
    sampled = [r for r in all_recs[:n] if r.get("sampled")]
    sigma = math.sqrt(n * 0.2 * 0.8)
    assert abs(len(sampled) - n * 0.2) < 4 * sigma
    assert all("request_body" in r and "sk-client" not in json.dumps(r) for r in sampled)
    stream = all_recs[n]
    assert stream["stream"] is True and stream["completion_tokens"] == 5
    err = all_recs[n + 1]
    assert err["status"] == 400 and err["sampled"] is True  # log_errors: bodies of errors
    assert "invalid_json" in err["response_body"]


def test_token_usage_is_read_from_the_last_usage_object() -> None:
    from sentinel.payloads.record import usage_of

    stream = (
        b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":1}}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":5, "completion_tokens": 7}}\n\n'
        b'data: {"choices":[],"usage":null}\n\ndata: [DONE]\n\n'
    )
    assert usage_of(stream, True) == {"prompt_tokens": 5, "completion_tokens": 7}
    body = b'{"usage": {"prompt_tokens": 3, "total_tokens": 3}, "model": "m"}'
    assert usage_of(body, False) == {"prompt_tokens": 3, "total_tokens": 3}
    assert usage_of(b'{"usage": {"prompt_tokens": "3"}}', False) is None
    assert usage_of(b'{"usage": null}', False) is None
    assert usage_of(b"not json at all", False) is None
