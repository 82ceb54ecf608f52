"""A small OpenAI-compatible server for tests: runs on a loopback port in a thread.

Behaviour per request from headers (the proxy forwards them):
  x-fake-delay: seconds before the response starts
  x-fake-status: answer with this status (an OpenAI-style error body)
  x-fake-chunk-interval: seconds between streamed chunks
Behaviour for every request from ``FakeOpenAI.mode`` (status, delay), set by the test.
Every request received is kept in ``requests`` (method, path, headers, JSON body).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web

from tests.helpers import free_port
from tests.loop_thread import LoopThread


class FakeOpenAI:
    def __init__(self, name: str, model: str = "fake-model") -> None:
        self.name = name
        self.model = model
        self.port = free_port()
        self.mode: dict[str, Any] = {"status": None, "delay": 0.0}
        self.requests: list[dict[str, Any]] = []
        self.active = 0
        self._runner: web.AppRunner | None = None
        self._thread = LoopThread(f"fake-{name}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ---- lifecycle -----------------------------------------------------------------
    def start(self) -> FakeOpenAI:
        async def serve() -> None:
            app = web.Application(client_max_size=64 * 1024 * 1024)
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

        self._thread.start(serve, timeout=10)
        return self

    def stop(self) -> None:
        self._thread.stop(self._runner.cleanup if self._runner is not None else None)

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- behaviour -----------------------------------------------------------------
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        self.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "body": body,
                "at": time.time(),
            }
        )
        self.active += 1
        try:
            return await self._answer(request, body)
        finally:
            self.active -= 1

    async def _answer(self, request: web.Request, body: Any) -> web.StreamResponse:
        h = request.headers
        delay = float(h.get("x-fake-delay", self.mode.get("delay") or 0))
        status = h.get("x-fake-status") or self.mode.get("status")
        if delay:
            await asyncio.sleep(delay)
        common = {"x-fake-name": self.name}
        if status:
            err = {
                "error": {
                    "message": f"{self.name} says {status}",
                    "type": "fake",
                    "param": None,
                    "code": int(status),
                }
            }
            return web.json_response(err, status=int(status), headers=common)
        if request.path == "/v1/models":
            return web.json_response(
                {"object": "list", "data": [{"id": self.model, "object": "model"}]},
                headers=common,
            )
        if request.path == "/v1/embeddings":
            return web.json_response(
                {
                    "object": "list",
                    "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                    "model": body.get("model") if body else None,
                    "usage": {"prompt_tokens": 2, "total_tokens": 2},
                },
                headers=common,
            )
        n = int((body or {}).get("max_tokens") or 4)
        model = (body or {}).get("model")
        if body and body.get("stream"):
            interval = float(h.get("x-fake-chunk-interval", 0))
            resp = web.StreamResponse(headers={"content-type": "text/event-stream", **common})
            await resp.prepare(request)
            for i in range(n):
                chunk = {
                    "id": "cmpl-fake",
                    "object": "text_completion",
                    "model": model,
                    "choices": [{"index": 0, "text": f"t{i} ", "finish_reason": None}],
                }
                await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                if interval:
                    await asyncio.sleep(interval)
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        text = " ".join(f"t{i}" for i in range(n))
        return web.json_response(
            {
                "id": "cmpl-fake",
                "object": "text_completion",
                "model": model,
                "served_by": self.name,
                "choices": [{"index": 0, "text": text, "finish_reason": "length"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n},
            },
            headers=common,
        )
