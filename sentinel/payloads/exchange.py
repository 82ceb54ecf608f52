"""One proxied exchange (a client request and Sentinel's answer): the facts gathered
while it runs, and the payload record made of them when it ends. The record's fields
are the payload log's schema (README, "Payload log")."""

from __future__ import annotations

import time
from typing import Any

from sentinel.payloads.log import PayloadRecord

CAPTURE_STREAM_BYTES = 64 * 1024  # a sampled stream's body kept for the record


class Exchange:
    """Per-request facts the payload record and the metrics need."""

    __slots__ = (
        "rid",
        "t0",
        "method",
        "path",
        "status",
        "tier",
        "upstream",
        "ttft",
        "gone",
        "error",
        "streamed",
        "events",
        "sample",
        "captured",
        "captured_n",
        "hops",
        "key_id",
    )

    def __init__(self, rid: str, t0: float, sample: bool, method: str, path: str) -> None:
        self.rid = rid
        self.t0 = t0
        self.method = method
        self.path = path
        self.status = 0
        self.tier = "none"
        self.upstream: str | None = None
        self.ttft: float | None = None
        self.gone = False  # the client went away before the answer ended
        self.error: str | None = None
        self.streamed = False
        self.events = 0
        self.sample = sample
        self.captured: list[bytes] = []
        self.captured_n = 0
        self.hops: list[tuple[str, str]] = []
        self.key_id: str | None = None  # the client API key's id (never the key)

    def capture(self, chunk: bytes) -> None:
        """A part of a streamed answer: counted, and kept for the record (a sampled
        stream's first 64 KiB; otherwise only the tail, where the usage is)."""
        self.events += chunk.count(b"data: ")
        if self.captured_n < CAPTURE_STREAM_BYTES or not self.sample:
            self.captured.append(chunk)
            self.captured_n += len(chunk)
            if not self.sample and len(self.captured) > 2:
                del self.captured[0]


def exchange_record(
    ex: Exchange,
    model: str | None,
    headers: list[tuple[bytes, bytes]] | None,
    body: bytes | None,
    log_errors: bool,
    latency: float,
) -> PayloadRecord:
    """The payload record of a finished exchange (bodies when sampled, or when it failed
    and ``log_errors``)."""
    status = ex.status
    failed = status >= 400 or ex.error is not None
    with_bodies = ex.sample or (failed and log_errors)
    meta: dict[str, Any] = {
        "ts": time.time(),
        "request_id": ex.rid,
        "method": ex.method,
        "path": ex.path,
        "tier": ex.tier,
        "upstream": ex.upstream,
        "model": model,
        "status": status,
        "stream": ex.streamed,
        "prompt_tokens": None,
        "completion_tokens": None,
        "ttft_s": round(ex.ttft, 6) if ex.ttft is not None else None,
        "latency_s": round(latency, 6),
        "fallback_hops": [f"{t}={r}" for t, r in ex.hops],
        "client_disconnect": ex.gone,
    }
    if ex.key_id is not None:
        meta["key_id"] = ex.key_id
    if ex.error is not None:
        meta["error"] = ex.error
    if ex.streamed and ex.events:
        # without a usage object, one SSE event per token (minus [DONE]) is the estimate
        meta["completion_tokens"] = max(ex.events - 1, 0)
        meta["tokens_source"] = "events"
    answer = b"".join(ex.captured) if ex.captured else None
    return PayloadRecord(
        meta,
        _header_dict(headers) if with_bodies and headers is not None else None,
        body if with_bodies else None,
        answer if with_bodies else None,
        answer,
        ex.streamed,
        with_bodies,
    )


def _header_dict(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """The record's request headers: a name sent more than once has its values joined
    with ", " (as HTTP folds them)."""
    out: dict[str, str] = {}
    for k, v in headers:
        name, value = k.decode("latin-1"), v.decode("latin-1")
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out
