"""The proxy's raw ASGI application (no routing framework on the hot path).

Per request: read and check the body (size, UTF-8, JSON, model), walk the chain
(``Chain.open``) to a committed upstream response, relay it (a whole body in one
write; a stream chunk by chunk as each arrives), and record metadata. A watcher on
the client connection cancels the request, and with it the upstream request, the
moment the client goes away.

The fast path (``early_start``): the server calls it from the event-loop callback
that read a whole request, before the request's task has run. It checks the request
and, when the first tier can take it at once (``Chain.begin``), writes it upstream
there and then; the upstream's answer goes to the client from the read that brings
it (``_EarlyAnswer``). A whole answer is finished there (slot, breaker, record) and
the request's task is never created; a stream goes on from the upstream's reads and
is finished there at its end, likewise without a task. Anything else starts the
task, which finds the request begun or answered, and does the rest: timeouts,
fallback, a failed or slow stream, disconnects, records. On a busy loop this spares a
new request two waits behind every other ready callback, and the request the cost of
a task.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import os
import time
from collections.abc import Callable
from typing import Any

from sentinel.config.schema import ProxyConfig
from sentinel.logs import get_logger
from sentinel.payloads.log import PayloadLog, PayloadRecord
from sentinel.proxy.chain import (
    Begun,
    Chain,
    Exhausted,
    Opened,
    ProxyRequest,
    Tier,
    commit_kind,
)
from sentinel.proxy.errors import ProxyError, sse_error_event
from sentinel.proxy.metrics import ProxyMetrics
from sentinel.proxy.server import InlineResponse, chunk_writer
from sentinel.proxy.upstream import UpstreamError, UpstreamResponse

log = get_logger(__name__)

# paths whose JSON body must name a model
MODEL_PATHS = frozenset(
    {
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/moderations",
        "/v1/audio/speech",
        "/v1/rerank",
        "/v1/score",
    }
)
# client headers never forwarded (hop-by-hop, or set by Sentinel per upstream)
DROP_REQUEST_HEADERS = frozenset(
    {
        b"host",
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
        b"content-length",
        b"accept-encoding",
        b"x-request-id",
        b"proxy-authorization",
        b"expect",
    }
)
DROP_RESPONSE_HEADERS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"content-length",
        b"x-request-id",
        b"server",
        b"date",
    }
)
MAX_REQUEST_ID = 128
CAPTURE_STREAM_BYTES = 64 * 1024
WATCH_AFTER_S = 0.02
EARLY_METHODS = frozenset({"GET", "POST"})
# scope keys between the fast path and the request's task
EARLY_KEY = "sentinel.early"
BEGAN_KEY = "sentinel.began"


class _Ctx:
    """Per-request facts the payload record and metrics need."""

    __slots__ = (
        "rid",
        "t0",
        "status",
        "tier",
        "upstream",
        "ttft",
        "gone",
        "finished",
        "error",
        "streamed",
        "events",
        "sample",
        "captured",
        "captured_n",
        "hops",
        "watcher",
    )

    def __init__(self, rid: str, t0: float, sample: bool) -> None:
        self.rid = rid
        self.t0 = t0
        self.status = 0
        self.tier = "none"
        self.upstream: str | None = None
        self.ttft: float | None = None
        self.gone = False
        self.finished = False
        self.error: str | None = None
        self.streamed = False
        self.events = 0
        self.sample = sample
        self.captured: list[bytes] = []
        self.captured_n = 0
        self.hops: list[tuple[str, str]] = []
        self.watcher: asyncio.Task[None] | None = None


class _Early:
    """What ``early_start`` did for a request, for its task."""

    __slots__ = ("ctx", "req", "begun", "hook")

    def __init__(self, ctx: _Ctx, req: ProxyRequest, begun: Begun | None) -> None:
        self.ctx = ctx
        self.req = req
        self.begun = begun
        self.hook: _EarlyAnswer | None = None


class _EarlyAnswer:
    """``RawResponse.early`` for a begun request: answers the client from the upstream
    read that completes the answer (a whole body) or brings its first part (a stream),
    when the client can take it now; else it lets go and the task answers.

    Held (``hold``): the request's task has not been created. A whole answer is then
    finished here, slot, breaker and record included, and no task is ever created. A
    stream goes on from the upstream's reads (each part written as it comes), and is
    finished here at its end the same way. Anything else starts the task, which goes
    on as usual from where the stream is: a failure, a client that cannot take the
    answer or falls behind, a disconnect, the first-byte deadline, the stream's total
    time limit."""

    __slots__ = (
        "app",
        "ctx",
        "out",
        "tier",
        "resp",
        "parts",
        "req",
        "scope",
        "timer",
        "started",
    )

    def __init__(
        self,
        app: ProxyApp,
        ctx: _Ctx,
        out: InlineResponse,
        begun: Begun,
        req: ProxyRequest,
        scope: dict[str, Any],
    ) -> None:
        self.app = app
        self.ctx = ctx
        self.out = out
        self.tier = begun.tier
        self.resp = begun.resp
        self.started = begun.started
        self.parts: list[bytes] = []
        self.req = req
        self.scope = scope
        self.timer: asyncio.TimerHandle | None = None

    def hold(self, deadline: float) -> None:
        """The task is held back: start it at ``deadline`` (it then handles the
        timeout), when the upstream connection fails first, or when this hook lets
        go of the response without finishing the request."""
        self.timer = asyncio.get_running_loop().call_at(deadline, self.start_task)
        self.resp.on_lost = self.start_task

    def start_task(self) -> None:
        self.let_go()
        self.out.start_task()

    def let_go(self) -> None:
        """Cancel the timer and drop the response's references to this hook (no
        reference cycle is left for the garbage collector); the request's task, once
        started by any route, calls it too."""
        timer = self.timer
        if timer is not None:
            self.timer = None
            timer.cancel()
        resp = self.resp
        resp.on_lost = None
        resp.on_end = None

    def __call__(self, data: bytes, done: bool) -> bool:
        resp = self.resp
        kind = commit_kind(resp)
        if kind == "whole":
            if not done:
                self.parts.append(data)
                return True
            resp.early = None
            parts = self.parts
            if self._answer(b"".join(parts), True):
                if self.out.held:
                    self._finish()
                return True
            resp.requeue(parts)
            self.start_task()
            return False
        resp.early = None
        if kind == "fail" or done or not self._answer(data, False):
            self.start_task()  # the task falls back, or relays the stream
            return False
        sink = self.app._inline_sink(self.out.send_fn, resp, self.ctx)
        if sink is None or not self.out.held:
            self.start_task()  # the task relays the rest
            if sink is not None:
                resp.pipe(sink)
            return True
        # the rest of the stream from the upstream's reads; the first-byte deadline is
        # met, the stream's total time limit now applies (as in the task's relay)
        resp.pipe(sink)
        if self.timer is not None:
            self.timer.cancel()
        deadline = Chain.total_deadline(self.tier, self.req, self.started)
        self.timer = asyncio.get_running_loop().call_at(deadline, self.start_task)
        resp.on_end = self._stream_end
        return True

    def _stream_end(self) -> None:
        """The upstream's stream ended with every part written: end the client's body
        and finish the request here, unless the task has been started meanwhile."""
        if not self.out.held or not self.out.end_body():
            self.start_task()  # (a disconnect already started it: then a no-op)
            return
        self.ctx.finished = True
        self._finish()

    def _answer(self, body: bytes, whole: bool) -> bool:
        out = self.out
        if not out.ready():
            return False
        ctx = self.ctx
        resp = self.resp
        _served(ctx, self.tier, resp)
        headers = self.app._response_headers(resp, ctx, len(body) if whole else None)
        resp.committed = True
        if whole:
            ctx.captured = [body]
            ctx.finished = True
        else:
            ctx.streamed = True
            self.app._capture(ctx, body)
        out.respond(resp.status, headers, body, not whole)
        ctx.ttft = time.perf_counter() - ctx.t0
        return True

    def _finish(self) -> None:
        """What the task would do after a whole answer or a stream's end: the slot
        back, the breaker told of the success, the request recorded; the task is then
        never created."""
        self.let_go()
        self.out.no_task()
        self.scope.pop(EARLY_KEY, None)
        tier = self.tier
        tier.breaker.success()
        tier.release()
        self.app._record(self.ctx, self.req, self.scope)


def _served(ctx: _Ctx, tier: Tier, resp: UpstreamResponse) -> None:
    """Note in ``ctx`` the tier whose answer the client gets."""
    ctx.tier = tier.name
    ctx.upstream = tier.url_base()
    ctx.status = resp.status


_ID_PREFIX = os.urandom(6).hex()
_ID_COUNTER = itertools.count(1)


def _request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's x-request-id when it is sane, else a new one (process prefix + counter)."""
    for k, v in headers:
        if k == b"x-request-id":
            if 0 < len(v) <= MAX_REQUEST_ID and v.isascii() and v.decode().isprintable():
                return v.decode()
            break
    return f"{_ID_PREFIX}{next(_ID_COUNTER):010x}"


class ProxyApp:
    def __init__(
        self,
        cfg: ProxyConfig,
        chain: Chain,
        metrics: ProxyMetrics,
        payloads: PayloadLog | None = None,
    ) -> None:
        self.cfg = cfg
        self.chain = chain
        self.metrics = metrics
        self.payloads = payloads
        self.max_body = cfg.max_body_bytes
        self.request_timeout_s = cfg.request_timeout_s
        # issue 16, drain: while set, a new request is answered with this error (503 +
        # Retry-After); requests accepted before finish. ``accepted`` counts requests
        # taken in and not yet recorded (every accepted request is recorded once).
        self.drain_gate: ProxyError | None = None
        self.accepted = 0

    # ---- ASGI entry ------------------------------------------------------------------
    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    def _new_ctx(self, headers: list[tuple[bytes, bytes]]) -> _Ctx:
        payloads = self.payloads
        sample = payloads is not None and payloads.should_sample()
        return _Ctx(_request_id(headers), time.perf_counter(), sample)

    # ---- the fast path, from the server's read callback ----------------------------
    def early_start(self, scope: dict[str, Any], body: bytes, out: InlineResponse) -> bool:
        """Called by the server with a whole request, before the request's task runs:
        check it and, when the first tier can take it at once, send it upstream now.
        Any problem (a bad request, a tier that would wait) is left to the task.
        True: the request's task is held back (``out.held``), and the early answer
        starts it, or finishes the request without it."""
        if BEGAN_KEY in scope or scope["method"] not in EARLY_METHODS:
            return False
        if self.drain_gate is not None:
            return False  # the task answers it: 503 while draining
        ctx = self._new_ctx(scope["headers"])
        try:
            fwd, ctype = self._request_head(scope)
            if len(body) > self.max_body:
                return False
            req = self._request(scope, fwd, ctype, body, ctx)
        except ProxyError:
            return False  # the task answers it, with the body read the usual way
        begun = self.chain.begin(req)
        scope[EARLY_KEY] = _Early(ctx, req, begun)
        self.accepted += 1
        if begun is None:
            return False
        hook = _EarlyAnswer(self, ctx, out, begun, req, scope)
        begun.resp.early = hook
        scope[EARLY_KEY].hook = hook
        if not out.held:
            return False
        hook.hold(self.chain.first_byte_deadline(begun.tier, req, begun.started))
        return True

    async def _http(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        scope[BEGAN_KEY] = True
        early: _Early | None = scope.pop(EARLY_KEY, None)
        if early is not None and early.hook is not None:
            early.hook.let_go()  # this task takes over (the hook may still answer first)
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        ctx = early.ctx if early is not None else self._new_ctx(headers)
        if early is None:
            self.accepted += 1
        req: ProxyRequest | None = None
        arm: asyncio.TimerHandle | None = None
        main = asyncio.current_task()
        try:
            if early is None and self.drain_gate is not None:
                await self._send_error(send, self.drain_gate, ctx)
                return
            try:
                if early is not None:
                    req = early.req
                else:
                    req = await self._read_request(scope, receive, ctx)
            except ProxyError as err:
                await self._send_error(send, err, ctx)
                return
            ctx.hops = req.hops  # the chain appends to it as it walks
            assert main is not None
            # the disconnect watcher is armed only for requests still running after
            # WATCH_AFTER_S: the quick ones (most of a benchmark, none of a generation)
            # skip the cost of a task
            arm = asyncio.get_running_loop().call_later(
                WATCH_AFTER_S, self._arm_watch, receive, main, ctx
            )
            try:
                opened = await self.chain.open(req, early.begun if early is not None else None)
            except ProxyError as err:
                await self._send_error(send, err, ctx)
                return
            except Exhausted as ex:
                if ex.error is not None:
                    await self._send_error(send, ex.error, ctx)
                else:
                    assert ex.failure is not None
                    await self._send_failure(send, ex.failure, ctx)
                return
            await self._relay(opened, send, ctx, req)
        except asyncio.CancelledError:
            if ctx.gone and main is not None and main.uncancel() == 0:
                ctx.status = ctx.status or 499
                ctx.error = "client disconnected"
                self.metrics.client_disconnects.labels(ctx.tier).inc()
                return
            raise
        finally:
            ctx.finished = True
            if arm is not None:
                arm.cancel()
            if ctx.watcher is not None:
                ctx.watcher.cancel()
            self._record(ctx, req, scope)

    def _arm_watch(self, receive: Any, main: asyncio.Task[Any], ctx: _Ctx) -> None:
        if not ctx.finished:
            ctx.watcher = asyncio.get_running_loop().create_task(self._watch(receive, main, ctx))

    async def _watch(self, receive: Any, main: asyncio.Task[Any], ctx: _Ctx) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                if not ctx.finished:
                    ctx.gone = True
                    main.cancel()
                return

    # ---- request -----------------------------------------------------------------------
    async def _read_request(self, scope: dict[str, Any], receive: Any, ctx: _Ctx) -> ProxyRequest:
        fwd, ctype = self._request_head(scope)
        body = await self._read_body(receive)
        return self._request(scope, fwd, ctype, body, ctx)

    def _request_head(self, scope: dict[str, Any]) -> tuple[dict[str, str], bytes]:
        """Check the path and the headers; the headers to forward, and the content type."""
        path: str = scope["path"]
        if not path.startswith("/v1/"):
            raise ProxyError(
                404,
                f"Unknown path {path!r}: this port serves the OpenAI API under /v1/ "
                "(e.g. /v1/chat/completions, /v1/models)",
                "unknown_path",
            )
        fwd: dict[str, str] = {}
        declared = None
        ctype = b""
        for k, v in scope["headers"]:
            if k == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    raise ProxyError(
                        400, "Content-Length is not a number", "invalid_content_length"
                    ) from None
            elif k == b"content-type":
                ctype = v
            if k not in DROP_REQUEST_HEADERS:
                fwd[k.decode("latin-1")] = v.decode("latin-1")
        if declared is not None and declared > self.max_body:
            raise self._too_large(declared)
        return fwd, ctype

    def _request(
        self, scope: dict[str, Any], fwd: dict[str, str], ctype: bytes, body: bytes, ctx: _Ctx
    ) -> ProxyRequest:
        """Check the body (UTF-8, JSON, model) and build the request to forward."""
        path: str = scope["path"]
        method: str = scope["method"]
        payload: dict[str, Any] | None = None
        model: str | None = None
        if body and (not ctype or b"json" in ctype or b"text/" in ctype):
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ProxyError(
                    400,
                    f"Request body is not valid UTF-8 (bad byte at offset {exc.start})",
                    "invalid_utf8",
                ) from None
            try:
                parsed = json.loads(text)
            except ValueError as exc:
                raise ProxyError(
                    400, f"Request body is not valid JSON: {exc}", "invalid_json"
                ) from None
            if isinstance(parsed, dict):
                payload = parsed
                m = parsed.get("model")
                model = m if isinstance(m, str) else None
                ctx.streamed = parsed.get("stream") is True
            elif path in MODEL_PATHS:
                raise ProxyError(400, "Request body must be a JSON object", "invalid_body")
        if method == "POST" and path in MODEL_PATHS:
            if payload is None:
                raise ProxyError(
                    400,
                    f"{path} needs a JSON body with a 'model' field",
                    "missing_body",
                )
            if not model:
                raise ProxyError(
                    400,
                    "you must provide a model parameter ('model': a non-empty string)",
                    "missing_model",
                    param="model",
                )
        qs: bytes = scope["query_string"]
        raw: bytes = scope.get("raw_path") or path.encode()
        target = (raw + b"?" + qs if qs else raw).decode("latin-1")
        deadline = asyncio.get_running_loop().time() + self.request_timeout_s
        return ProxyRequest(ctx.rid, method, target, fwd, body, payload, model, deadline)

    def _too_large(self, size: int) -> ProxyError:
        return ProxyError(
            413,
            f"Request body is {size} bytes, over the limit of {self.max_body} "
            "(proxy.max_body_bytes)",
            "body_too_large",
        )

    async def _read_body(self, receive: Any) -> bytes:
        msg = await receive()
        body: bytes = msg.get("body", b"")
        if len(body) > self.max_body:
            raise self._too_large(len(body))
        if not msg.get("more_body"):
            return body
        parts = [body]
        size = len(body)
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise ProxyError(
                    400, "client disconnected while sending the body", "client_disconnected"
                )
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise self._too_large(size)
            parts.append(chunk)
            if not msg.get("more_body"):
                return b"".join(parts)

    # ---- responses ---------------------------------------------------------------------
    def _meta_headers(self, ctx: _Ctx, hops: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
        out = [(b"x-request-id", ctx.rid.encode())]
        if ctx.tier != "none":
            out.append((b"x-sentinel-upstream", ctx.tier.encode()))
        out.append((b"x-sentinel-fallback-hops", str(len(hops)).encode()))
        if hops:
            out.append((b"x-sentinel-fallbacks", ",".join(f"{t}={r}" for t, r in hops).encode()))
        return out

    async def _send_error(self, send: Any, err: ProxyError, ctx: _Ctx) -> None:
        body = err.body()
        ctx.status = err.status
        ctx.error = err.message
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        if err.retry_after is not None:
            headers.append((b"retry-after", str(int(err.retry_after)).encode()))
        headers += self._meta_headers(ctx, ctx.hops)
        ctx.captured = [body]
        await send({"type": "http.response.start", "status": err.status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _send_failure(self, send: Any, failure: Any, ctx: _Ctx) -> None:
        ctx.status = failure.status
        ctx.tier = failure.tier
        ctx.error = f"upstream {failure.tier} answered {failure.status}"
        headers = [(k, v) for k, v in failure.headers if k not in DROP_RESPONSE_HEADERS]
        headers.append((b"content-length", str(len(failure.body)).encode()))
        headers += self._meta_headers(ctx, ctx.hops)
        ctx.captured = [failure.body]
        await send({"type": "http.response.start", "status": failure.status, "headers": headers})
        await send({"type": "http.response.body", "body": failure.body, "more_body": False})

    def _response_headers(
        self, resp: UpstreamResponse, ctx: _Ctx, length: int | None
    ) -> list[tuple[bytes, bytes]]:
        headers = [(k, v) for k, v in resp.headers if k not in DROP_RESPONSE_HEADERS]
        if length is not None:
            headers.append((b"content-length", str(length).encode()))
        headers += self._meta_headers(ctx, ctx.hops)
        return headers

    async def _relay(self, opened: Opened, send: Any, ctx: _Ctx, req: ProxyRequest) -> None:
        tier = opened.tier
        resp = opened.resp
        _served(ctx, tier, resp)
        upstream_failed = False
        try:
            if opened.complete:
                if opened.sent:  # answered whole from the upstream's read
                    return
                body = opened.first
                headers = self._response_headers(resp, ctx, len(body))
                ctx.captured = [body]
                ctx.ttft = time.perf_counter() - ctx.t0
                ctx.finished = True
                await send(
                    {"type": "http.response.start", "status": resp.status, "headers": headers}
                )
                await send({"type": "http.response.body", "body": body, "more_body": False})
                return
            ctx.streamed = True
            sse = "text/event-stream" in resp.content_type
            if not opened.sent:  # else head and first part went from the upstream's read
                headers = self._response_headers(resp, ctx, None)
                await send(
                    {"type": "http.response.start", "status": resp.status, "headers": headers}
                )
                first = opened.first
                await send({"type": "http.response.body", "body": first, "more_body": True})
                ctx.ttft = time.perf_counter() - ctx.t0
                self._capture(ctx, first)
            deadline = Chain.total_deadline(tier, req, opened.started)
            tail_error: tuple[str, str, int] | None = None
            try:
                async with asyncio.timeout_at(deadline):
                    rest = opened.rest
                    sink = self._inline_sink(send, rest, ctx)
                    if sink is not None:  # every part written in the read that brings it
                        await rest.relay_inline(sink)
                    async for chunk in rest:  # the rest (a slow client), or all of it
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                        self._capture(ctx, chunk)
            except TimeoutError:
                opened.abort()
                tail_error = ("request time limit reached while streaming", "timeout", 504)
            except UpstreamError as exc:
                upstream_failed = True
                tail_error = (
                    f"upstream {tier.name} failed mid-stream: {exc.detail}",
                    exc.reason,
                    502,
                )
            if tail_error is not None:
                ctx.error = tail_error[0]
                if not sse:
                    return  # not completing the body closes the connection: a visible error
                event = sse_error_event(*tail_error)
                await send({"type": "http.response.body", "body": event, "more_body": True})
            ctx.finished = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except BaseException:
            opened.abort()
            raise
        finally:
            opened.finish(upstream_failed)

    def _inline_sink(self, send: Any, rest: Any, ctx: _Ctx) -> Callable[[bytes], bool] | None:
        """For ``RawResponse.relay_inline``: each later part of a stream written to the
        client in the upstream read that brings it (``server.chunk_writer``), and
        captured; a part the writer refuses (a slow client) goes through ``send``.
        None: relay through ``send`` only (another upstream client or server)."""
        if not hasattr(rest, "relay_inline"):
            return None
        return chunk_writer(send, functools.partial(self._capture, ctx))

    def _capture(self, ctx: _Ctx, chunk: bytes) -> None:
        ctx.events += chunk.count(b"data: ")
        if ctx.captured_n < CAPTURE_STREAM_BYTES or not ctx.sample:
            ctx.captured.append(chunk)
            ctx.captured_n += len(chunk)
            if not ctx.sample and len(ctx.captured) > 2:
                del ctx.captured[0]  # only the tail is needed for token usage

    # ---- records -------------------------------------------------------------------------
    def _record(self, ctx: _Ctx, req: ProxyRequest | None, scope: dict[str, Any]) -> None:
        self.accepted -= 1
        latency = time.perf_counter() - ctx.t0
        status = ctx.status
        self.metrics.request(ctx.tier, status, ctx.ttft, latency)
        payloads = self.payloads
        if payloads is None:
            return
        failed = status >= 400 or ctx.error is not None
        with_bodies = ctx.sample or (failed and payloads.cfg.log_errors)
        meta: dict[str, Any] = {
            "ts": time.time(),
            "request_id": ctx.rid,
            "method": scope["method"],
            "path": scope["path"],
            "tier": ctx.tier,
            "upstream": ctx.upstream,
            "model": req.model if req is not None else None,
            "status": status,
            "stream": ctx.streamed,
            "prompt_tokens": None,
            "completion_tokens": None,
            "ttft_s": round(ctx.ttft, 6) if ctx.ttft is not None else None,
            "latency_s": round(latency, 6),
            "fallback_hops": [f"{t}={r}" for t, r in ctx.hops],
            "client_disconnect": ctx.gone,
        }
        if ctx.error is not None:
            meta["error"] = ctx.error
        if ctx.streamed and ctx.events:
            # without a usage object, one SSE event per token (minus [DONE]) is the estimate
            meta["completion_tokens"] = max(ctx.events - 1, 0)
            meta["tokens_source"] = "events"
        body = b"".join(ctx.captured) if ctx.captured else None
        payloads.submit(
            PayloadRecord(
                meta,
                req.headers if (with_bodies and req is not None) else None,
                req.body if (with_bodies and req is not None) else None,
                body if with_bodies else None,
                body,
                ctx.streamed,
                with_bodies,
            )
        )
