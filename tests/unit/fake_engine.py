"""A fake vLLM HTTP server for probe and ops unit tests (loopback, own thread).

It answers /health, /v1/models, /v1/completions and /metrics the way vLLM's
OpenAI server does, and misbehaves on request through ``mode``:
  delay        seconds before a completion answers (a hung engine: large)
  status       HTTP status for completions (e.g. 500)
  metrics      the /metrics body (text); metrics_status: HTTP status for /metrics
Every request is kept in ``requests`` (method, path, headers, JSON body).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import uvicorn
import uvloop
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from tests.helpers import free_port
from tests.loop_thread import LoopThread

VLLM_METRICS = """\
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{{generation="0"}} 1234.0
# HELP process_resident_memory_bytes Resident memory size in bytes.
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 1.2e+09
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="tiny"}} {running}
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0",model_name="tiny"}} {waiting}
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{engine="0",model_name="tiny"}} 0.25
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{{engine="0",model_name="tiny"}} {prompt}
# HELP vllm:prompt_tokens_created Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_created gauge
vllm:prompt_tokens_created{{engine="0",model_name="tiny"}} 1.7637e+09
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{{engine="0",model_name="tiny"}} {generation}
# HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency in seconds.
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_sum{{engine="0",model_name="tiny"}} 3.5
vllm:e2e_request_latency_seconds_bucket{{engine="0",le="0.3",model_name="tiny"}} 1.0
vllm:e2e_request_latency_seconds_bucket{{engine="0",le="1.0",model_name="tiny"}} 4.0
vllm:e2e_request_latency_seconds_bucket{{engine="0",le="+Inf",model_name="tiny"}} 5.0
vllm:e2e_request_latency_seconds_count{{engine="0",model_name="tiny"}} 5.0
"""


def vllm_metrics(
    running: float = 0, waiting: float = 0, prompt: float = 10, generation: float = 20
) -> str:
    return VLLM_METRICS.format(
        running=running, waiting=waiting, prompt=prompt, generation=generation
    )


class FakeEngine:
    def __init__(self, model: str = "tiny") -> None:
        self.model = model
        self.port = free_port()
        self.mode: dict[str, Any] = {
            "delay": 0.0,
            "status": None,
            "metrics": vllm_metrics(),
            "metrics_status": 200,
        }
        self.requests: list[dict[str, Any]] = []
        self._server: uvicorn.Server | None = None
        self._serving: asyncio.Task[None] | None = None
        # uvloop, as uvicorn's own Server.run would pick (loop="auto")
        self._thread = LoopThread("fake-engine", loop_factory=uvloop.new_event_loop)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def paths(self, path: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"] == path]

    # ---- lifecycle -------------------------------------------------------------
    def start(self) -> FakeEngine:
        app = Starlette(
            routes=[
                Route("/health", self._health),
                Route("/v1/models", self._models),
                Route("/v1/completions", self._completions, methods=["POST"]),
                Route("/metrics", self._metrics),
            ]
        )
        cfg = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=0.5,
        )
        self._server = server = uvicorn.Server(cfg)

        async def serve() -> None:
            self._serving = serving = asyncio.create_task(server.serve())
            while not server.started:
                if serving.done():
                    serving.result()
                    raise RuntimeError("the fake engine stopped before it listened")
                await asyncio.sleep(0.01)

        self._thread.start(serve, timeout=10)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True

        async def finish() -> None:
            if self._serving is not None:
                await self._serving

        self._thread.stop(finish)

    def __enter__(self) -> FakeEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- endpoints -------------------------------------------------------------
    async def _record(self, request: Request) -> Any:
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        self.requests.append(
            {
                "method": request.method,
                "path": request.url.path,
                "headers": dict(request.headers),
                "body": body,
            }
        )
        return body

    async def _health(self, request: Request) -> Response:
        await self._record(request)
        return Response(status_code=200)

    async def _models(self, request: Request) -> Response:
        await self._record(request)
        return JSONResponse({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def _completions(self, request: Request) -> Response:
        body = await self._record(request)
        if self.mode["delay"]:
            await asyncio.sleep(self.mode["delay"])
        if self.mode["status"]:
            return JSONResponse(
                {"error": {"message": "fake failure"}}, status_code=self.mode["status"]
            )
        if (body or {}).get("model") != self.model:
            return JSONResponse(
                {"error": {"message": f"model {body.get('model')} not found"}}, status_code=404
            )
        return JSONResponse(
            {
                "id": "cmpl-1",
                "object": "text_completion",
                "model": self.model,
                "choices": [{"index": 0, "text": "x", "finish_reason": "length"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        )

    async def _metrics(self, request: Request) -> Response:
        await self._record(request)
        return PlainTextResponse(self.mode["metrics"], status_code=self.mode["metrics_status"])
