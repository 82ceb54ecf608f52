"""The payload log: a bounded queue in front of one writer thread.

``submit`` never blocks: when the queue is full the record is dropped and counted.
A metadata-only record becomes its JSON line in ``submit`` (on the event loop: a
few microseconds, and the writer thread then never takes the GIL from the loop for
long); a sampled record is redacted and capped on the writer thread
(``record.build_line``). The writer appends the lines to the current
``payloads-*.jsonl`` file, rotated at ``max_file_bytes``, the oldest files deleted to
stay under ``max_total_bytes`` (``files.PayloadFiles``). A write error (a full
disk, a vanished directory) drops that batch and counts it; requests never notice.

Bodies are admitted in ``submit``, whoever calls it: a failed request's bodies only at
``error_sample_rate`` and at most ``max_error_bodies_per_s`` a second, and at most
``BODY_RECORDS_QUEUED`` records with bodies wait for the writer; each body is cut to
the record's cap (plus a margin) at once, so a flood of failing 4 MiB requests costs
neither memory nor the writer's time. A record whose bodies are not admitted keeps its
metadata line; the bodies are counted in ``sentinel_payload_bodies_dropped_total``.
"""

from __future__ import annotations

import asyncio
import errno
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from prometheus_client import CollectorRegistry, Counter, Gauge

from sentinel.config.schema import PayloadLogConfig
from sentinel.logs import get_logger
from sentinel.payloads.files import PayloadFiles, open_append
from sentinel.payloads.record import Redactor, build_line, clip

log = get_logger(__name__)

_STOP = object()
HANDOFF_S = 0.05
# records with bodies queued or pending, at most (each is at most ~2 x (cap + margin))
BODY_RECORDS_QUEUED = 64
# the tail of a large response in which token usage is looked for
USAGE_TAIL = 65536


@dataclass(slots=True)
class PayloadRecord:
    meta: dict[str, Any]
    request_headers: dict[str, str] | None
    request_body: bytes | None
    response_body: bytes | None
    usage_source: bytes | None
    streamed: bool
    with_bodies: bool


def failed(meta: dict[str, Any]) -> bool:
    """A failed request: an error status, an error, or a client that went away."""
    status = meta.get("status")
    return (
        (isinstance(status, int) and status >= 400)
        or bool(meta.get("error"))
        or bool(meta.get("client_disconnect"))
    )


class RateCap:
    """A token bucket: at most ``rate`` a second, bursts of up to ``max(1, rate)``."""

    def __init__(self, rate: float, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = max(1.0, rate)
        self._clock = clock
        self._tokens = self.burst
        self._at = clock()

    def take(self) -> bool:
        if self.rate <= 0:
            return False
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class PayloadLog:
    def __init__(
        self,
        cfg: PayloadLogConfig,
        registry: CollectorRegistry,
        rng: Callable[[], float] = random.random,
        opener: Callable[[Path], BinaryIO] = open_append,
        queue_size: int = 10_000,
        batch: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.dir = Path(cfg.dir)
        self._rng = rng
        self._q: queue.Queue[Any] = queue.Queue()
        self._limit = queue_size  # records queued or pending, at most
        self._queued = 0
        self._bodies_queued = 0
        self._error_cap = RateCap(cfg.max_error_bodies_per_s, clock)
        self._count_lock = threading.Lock()
        self._pending: list[PayloadRecord | bytes] = []
        self._timer: asyncio.TimerHandle | None = None
        self._batch = batch
        self._redactor = Redactor(cfg.redact_patterns)
        self._thread: threading.Thread | None = None
        self._failing = False
        self.written = Counter(
            "sentinel_payload_records",
            "Payload records written, by kind (metadata only, or sampled with bodies).",
            ["kind"],
            registry=registry,
        )
        self.dropped = Counter(
            "sentinel_payload_records_dropped",
            "Payload records dropped, by reason (queue_full, write_error).",
            ["reason"],
            registry=registry,
        )
        self.bodies_dropped = Counter(
            "sentinel_payload_bodies_dropped",
            "Records kept without their bodies, by reason (error_sampled_out: "
            "error_sample_rate; error_rate_cap: max_error_bodies_per_s; "
            "bodies_queue_full: too many records with bodies waiting for the writer).",
            ["reason"],
            registry=registry,
        )
        self._bodies_sampled_out = self.bodies_dropped.labels("error_sampled_out")
        self._bodies_rate_cap = self.bodies_dropped.labels("error_rate_cap")
        self._bodies_queue_full = self.bodies_dropped.labels("bodies_queue_full")
        self.truncated = Counter(
            "sentinel_payload_records_truncated",
            "Sampled records whose bodies were cut to max_record_bytes.",
            registry=registry,
        )
        self.deleted = Counter(
            "sentinel_payload_files_deleted",
            "Payload files deleted to stay under max_total_bytes.",
            registry=registry,
        )
        self.files = PayloadFiles(
            self.dir, cfg.max_file_bytes, cfg.max_total_bytes, self.deleted, opener
        )
        Gauge(
            "sentinel_payload_disk_bytes",
            "Bytes of payload files on disk (as written by Sentinel).",
            registry=registry,
        ).set_function(self.disk_bytes)
        self._dropped_queue = self.dropped.labels("queue_full")
        self._dropped_write = self.dropped.labels("write_error")
        self._written_meta = self.written.labels("metadata")
        self._written_sampled = self.written.labels("sampled")

    # ---- request path ------------------------------------------------------------
    def should_sample(self) -> bool:
        rate = self.cfg.sample_rate
        return rate > 0 and (rate >= 1 or self._rng() < rate)

    def submit(self, record: PayloadRecord) -> None:
        """Queue a record; never blocks. On an event loop, records are handed to the
        writer in batches (every HANDOFF_S or BATCH records), so the writer thread wakes
        a few times a second instead of once per request."""
        if self._queued >= self._limit:
            self._dropped_queue.inc()
            return
        usage = record.usage_source
        if usage is not None and len(usage) > USAGE_TAIL:
            # usage comes last in an OpenAI answer: never scan or keep a whole 4 MiB body
            record.usage_source = usage[-USAGE_TAIL:]
        if record.with_bodies:
            record = self._admit_bodies(record)
        self._queued += 1
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._put([record])
            return
        item: PayloadRecord | bytes = record
        if not record.with_bodies:
            item = self._line(record)
        pending = self._pending
        pending.append(item)
        if len(pending) >= self._batch:
            self._handoff()
        elif self._timer is None:
            self._timer = loop.call_later(HANDOFF_S, self._handoff)

    def _admit_bodies(self, rec: PayloadRecord) -> PayloadRecord:
        """``rec`` with its bodies cut to the cap, or without them when not admitted."""
        drop = None
        if failed(rec.meta):
            if self.cfg.error_sample_rate < 1 and self._rng() >= self.cfg.error_sample_rate:
                drop = self._bodies_sampled_out
            elif not self._error_cap.take():
                drop = self._bodies_rate_cap
        if drop is None and self._bodies_queued >= BODY_RECORDS_QUEUED:
            drop = self._bodies_queue_full
        usage = rec.usage_source
        if drop is not None:
            drop.inc()
            return PayloadRecord(rec.meta, None, None, None, usage, rec.streamed, False)
        with self._count_lock:
            self._bodies_queued += 1
        cap = self.cfg.max_record_bytes
        return PayloadRecord(
            rec.meta,
            rec.request_headers,
            clip(rec.request_body, cap),
            clip(rec.response_body, cap),
            usage,
            rec.streamed,
            True,
        )

    def _handoff(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pending:
            batch, self._pending = self._pending, []
            self._put(batch)

    def _line(self, rec: PayloadRecord) -> bytes:
        line = build_line(
            rec.meta,
            rec.request_headers,
            rec.request_body,
            rec.response_body,
            rec.usage_source,
            rec.streamed,
            rec.with_bodies,
            self._redactor,
            self.cfg.max_record_bytes - 1,
        )
        if rec.with_bodies and '"truncated":true' in line:
            self.truncated.inc()
        return line.encode() + b"\n"

    def _put(self, batch: list[PayloadRecord | bytes]) -> None:
        self._q.put_nowait(batch)  # unbounded queue: the bound is _limit records

    def _done(self, n: int, bodies: int = 0) -> None:
        with self._count_lock:
            self._queued -= n
            self._bodies_queued -= bodies

    # ---- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self.files.scan_existing()
        self._thread = threading.Thread(target=self._run, name="payload-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is None:
            return
        self._handoff()
        self._q.put(_STOP)
        self._thread.join(timeout)
        self._thread = None

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until every record submitted so far is written or dropped (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while (self._queued or self._q.unfinished_tasks) and time.monotonic() < deadline:
            time.sleep(0.005)

    @property
    def pending(self) -> int:
        """Records submitted and not yet written or dropped."""
        return self._queued

    def disk_bytes(self) -> int:
        return self.files.disk_bytes()

    # ---- writer thread -------------------------------------------------------------
    def _run(self) -> None:
        q = self._q
        while True:
            items = [q.get()]
            while True:
                try:
                    items.append(q.get_nowait())
                except queue.Empty:
                    break
            stop = any(it is _STOP for it in items)
            records = [r for it in items if it is not _STOP for r in it]
            bodies = sum(1 for r in records if isinstance(r, PayloadRecord) and r.with_bodies)
            try:
                for i in range(0, len(records), self._batch):
                    self._write(records[i : i + self._batch])
            finally:
                self._done(len(records), bodies)
                for _ in items:
                    q.task_done()
            if stop:
                self.files.close()
                return

    def _write(self, records: list[PayloadRecord | bytes]) -> None:
        lines: list[bytes] = []
        sampled = 0
        for rec in records:
            if isinstance(rec, bytes):
                lines.append(rec)
            else:
                sampled += rec.with_bodies
                lines.append(self._line(rec))
        try:
            files = self.files
            for data in lines:
                files.append(data)
            files.flush()
        except OSError as exc:
            self._dropped_write.inc(len(records))
            self.files.discard_current()
            if not self._failing:
                self._failing = True
                log.warning(
                    "payload_write_failed",
                    error=exc.strerror or str(exc),
                    disk_full=exc.errno == errno.ENOSPC,
                    dir=str(self.dir),
                )
            return
        if self._failing:
            self._failing = False
            log.info("payload_write_recovered", dir=str(self.dir))
        self._written_meta.inc(len(records) - sampled)
        self._written_sampled.inc(sampled)
