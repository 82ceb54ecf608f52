"""One client request, start to end: checked (``RequestPolicy``), authenticated (the one
place for client API keys), walked through the chain (``Chain.open``), relayed
(``relay``), recorded (metrics and the payload log). Also the drain interface the
lifecycle uses: ``begin_drain`` / ``end_drain`` / ``in_flight`` / ``wait_idle``.

The HTTP server (``http1``) calls the handler once per whole request, one request at
a time per connection, and cancels it when the client goes away (``Response.gone``):
the upstream request is then cancelled with it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

from sentinel.config.schema import ProxyConfig
from sentinel.http1.response import Request, Response
from sentinel.logs import get_logger
from sentinel.payloads.exchange import Exchange, exchange_record
from sentinel.payloads.log import PayloadLog
from sentinel.proxy.attempt import UpstreamFailure
from sentinel.proxy.chain import Chain, Exhausted
from sentinel.proxy.errors import ProxyError
from sentinel.proxy.metrics import ProxyMetrics
from sentinel.proxy.relay import meta_headers, relay, relayed_headers
from sentinel.proxy.request import RequestPolicy, request_id
from sentinel.proxy.tier import ProxyRequest, Tier

log = get_logger(__name__)

# Client authentication (``sentinel.proxy.auth.Authenticator.check``): given a request's
# headers (lower-case names), the client key's id, or a ProxyError 401. Called before
# anything else about the request is looked at; None: no check.
Authenticate = Callable[[list[tuple[bytes, bytes]]], "str | None"]

# A stream that sent nothing for ``proxy.stream_idle_timeout_s`` mid-stream: its tier and
# the limit (issue 15: the local tier's feed stall detection). None: nobody is told.
StreamIdle = Callable[[Tier, float], None]


class ProxyHandler:
    def __init__(
        self,
        cfg: ProxyConfig,
        chain: Chain,
        metrics: ProxyMetrics,
        payloads: PayloadLog | None = None,
        authenticate: Authenticate | None = None,
        on_stream_idle: StreamIdle | None = None,
    ) -> None:
        self.cfg = cfg
        self.chain = chain
        self.metrics = metrics
        self.payloads = payloads
        self.policy = RequestPolicy(cfg)
        self.authenticate = authenticate
        self.stream_idle_s = cfg.stream_idle_timeout_s
        self.on_stream_idle = on_stream_idle
        # the tiers after the local one, for a drain with fallback (None: no such tier)
        rest = [t for t in chain.tiers if not t.local]
        self._without_local: Chain | None = None
        if rest and len(rest) < len(chain.tiers):
            self._without_local = Chain(rest, chain.status, chain.admission_cfg, metrics)
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False
        self._drain_retry_after = 1.0
        self.drain_fallback = False

    # ---- drain -----------------------------------------------------------------------
    def begin_drain(self, retry_after_s: float, fallback: bool) -> None:
        """From now on a new request gets 503 with Retry-After (or, with ``fallback``,
        skips the local tier for the next ones); requests in flight finish."""
        self.draining = True
        self._drain_retry_after = retry_after_s
        self.drain_fallback = fallback
        log.info("proxy_drain_begin", retry_after_s=retry_after_s, fallback=fallback)

    def end_drain(self) -> None:
        self.draining = False
        log.info("proxy_drain_end")

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once no request is in flight (at once if none is), False after
        ``timeout_s`` with some still running."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def _drain_chain(self, req: ProxyRequest) -> Chain:
        local = next((t for t in self.chain.tiers if t.local), None)
        if not self.drain_fallback or self._without_local is None or local is None:
            raise ProxyError(
                503,
                "this Sentinel is draining (shutting down or restarting its engine); "
                "retry after the Retry-After delay",
                "draining",
                retry_after=max(1, math.ceil(self._drain_retry_after)),
            )
        req.hops.append((local.name, "draining"))
        self.metrics.fallback(local.name, "draining")
        return self._without_local

    # ---- one request -----------------------------------------------------------------
    async def __call__(self, request: Request, out: Response) -> None:
        payloads = self.payloads
        sample = payloads is not None and payloads.should_sample()
        target = request.target.partition(b"?")[0][:512].decode("latin-1")
        ex = Exchange(
            request_id(request.headers), time.perf_counter(), sample, request.method, target
        )
        # the task and its loop, looked up once (each lookup of the running loop is a
        # getpid() system call in CPython 3.11)
        task = asyncio.current_task()
        assert task is not None
        loop = task.get_loop()
        req: ProxyRequest | None = None
        self.in_flight += 1
        if self.in_flight == 1:
            self._idle.clear()
        try:
            try:
                if self.authenticate is not None:  # client API keys: the one check, first
                    ex.key_id = self.authenticate(request.headers)
                req, ex.path, stream = self.policy.proxy_request(
                    ex.rid,
                    request.method,
                    request.target,
                    request.headers,
                    request.body,
                    loop.time(),
                )
                req.loop = loop
                ex.streamed = stream
                ex.hops = req.hops  # the chain appends to it as it walks
                chain = self._drain_chain(req) if self.draining else self.chain
                opened = await chain.open(req)
            except ProxyError as err:
                self._send_error(out, err, ex)
                return
            except Exhausted as exc:
                if exc.error is not None:
                    self._send_error(out, exc.error, ex)
                else:
                    assert exc.failure is not None
                    self._send_failure(out, exc.failure, ex)
                return
            await relay(opened, out, ex, req, self.stream_idle_s, self.metrics, self.on_stream_idle)
        except asyncio.CancelledError:
            if out.gone and task.uncancel() == 0:
                ex.gone = True
                ex.status = ex.status or 499
                ex.error = "client disconnected"
                self.metrics.client_disconnects.labels(ex.tier).inc()
                return
            raise
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()
            self._record(ex, req)

    def _send_error(self, out: Response, err: ProxyError, ex: Exchange) -> None:
        body = err.body()
        ex.status = err.status
        ex.error = err.message
        headers = [(b"content-type", b"application/json")]
        if err.retry_after is not None:
            headers.append((b"retry-after", str(int(err.retry_after)).encode()))
        headers += meta_headers(ex)
        ex.captured = [body]
        out.whole(err.status, headers, body)

    def _send_failure(self, out: Response, failure: UpstreamFailure, ex: Exchange) -> None:
        ex.status = failure.status
        ex.tier = failure.tier
        ex.error = f"upstream {failure.tier} answered {failure.status}"
        ex.captured = [failure.body]
        out.whole(failure.status, relayed_headers(failure.headers, ex), failure.body)

    def _record(self, ex: Exchange, req: ProxyRequest | None) -> None:
        latency = time.perf_counter() - ex.t0
        self.metrics.request(ex.tier, ex.status, ex.ttft, latency)
        payloads = self.payloads
        if payloads is None:
            return
        payloads.submit(
            exchange_record(
                ex,
                req.model if req is not None else None,
                req.headers if req is not None else None,
                req.body if req is not None else None,
                payloads.cfg.log_errors,
                latency,
            )
        )
