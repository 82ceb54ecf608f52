"""The inference probe: one real completion (fixed tiny prompt, ``max_tokens: 1``).

vLLM's own ``/health`` and ``/v1/models`` answer 200 while a hung engine serves
nothing; only a real completion proves the engine computes. The probe runs it
against the engine's loopback URL with a short overall timeout.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Mapping, Sequence

import httpx

from sentinel.config.schema import EngineConfig
from sentinel.state import ProbeResult

PROBE_NAME = "inference"
_DETAIL_MAX = 200


def engine_api_key(cfg: EngineConfig, environ: Mapping[str, str] | None = None) -> str | None:
    """The API key the engine demands (vLLM ``--api-key`` or ``VLLM_API_KEY``), if any."""
    env = os.environ if environ is None else environ
    if cfg.api_key_env:  # engine.api_key_env (a missing variable stops start-up: app.py)
        return env.get(cfg.api_key_env, "").strip() or None
    argv: Sequence[str] = cfg.command or cfg.args
    for i, arg in enumerate(argv):
        if arg == "--api-key" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--api-key="):
            return arg.split("=", 1)[1]
    return cfg.env.get("VLLM_API_KEY") or env.get("VLLM_API_KEY") or None


def configured_model_name(cfg: EngineConfig) -> str | None:
    """The served model name when Sentinel built the command; else ask /v1/models."""
    if cfg.command:
        return None
    return cfg.served_model_name or None


class ProbeFailed(Exception):
    """The engine answered, but not with a usable completion."""


class InferenceProbe:
    """Runs the readiness completion; never raises for engine trouble, returns a result."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        prompt: str,
        timeout_s: float,
        model: str | None = None,
        api_key: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._prompt = prompt
        self._timeout_s = timeout_s
        self._configured_model = model
        self._model: str | None = model
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._clock = clock
        self._in_flight = False
        self._timed_out = False

    def reset(self) -> None:
        """Forget what was learnt from the previous engine generation."""
        self._model = self._configured_model
        self._timed_out = False

    @property
    def timed_out(self) -> bool:
        """The last probe got no answer within ``timeout_s``."""
        return self._timed_out

    @property
    def timeout_s(self) -> float:
        return self._timeout_s

    @property
    def unanswered(self) -> bool:
        """The engine holds a probe without answering: one is waiting now, or the last
        one timed out (between two probes of a hung engine)."""
        return self._in_flight or self._timed_out

    async def run(self, base_url: str) -> ProbeResult:
        t0 = time.perf_counter()
        self._in_flight, self._timed_out = True, False
        try:
            async with asyncio.timeout(self._timeout_s):
                model = await self._model_name(base_url)
                await self._complete(base_url, model)
        except TimeoutError:
            self._timed_out = True
            return self._result(False, t0, f"timed out after {self._timeout_s:g}s")
        except httpx.ConnectError:
            return self._result(False, t0, "connection refused: the engine is not listening")
        except httpx.HTTPError as exc:
            return self._result(False, t0, f"{type(exc).__name__}: {exc}"[:_DETAIL_MAX])
        except ProbeFailed as exc:
            self.reset()  # a model name learnt from /v1/models may be stale
            return self._result(False, t0, str(exc)[:_DETAIL_MAX])
        finally:
            self._in_flight = False
        return self._result(True, t0, "")

    def _result(self, ok: bool, t0: float, detail: str) -> ProbeResult:
        return ProbeResult(
            name=PROBE_NAME,
            ok=ok,
            at=self._clock(),
            latency_s=round(time.perf_counter() - t0, 6),
            detail=detail,
        )

    async def _model_name(self, base_url: str) -> str:
        if self._model:
            return self._model
        resp = await self._client.get(f"{base_url}/v1/models", headers=self._headers)
        body = _json_body(resp, "GET /v1/models")
        try:
            self._model = str(body["data"][0]["id"])
        except (KeyError, IndexError, TypeError):
            raise ProbeFailed("GET /v1/models lists no model") from None
        return self._model

    async def _complete(self, base_url: str, model: str) -> None:
        payload = {
            "model": model,
            "prompt": self._prompt,
            "max_tokens": 1,
            "temperature": 0,
            "stream": False,
        }
        resp = await self._client.post(
            f"{base_url}/v1/completions", json=payload, headers=self._headers
        )
        body = _json_body(resp, "POST /v1/completions")
        choices = body.get("choices") if isinstance(body, dict) else None
        if not choices or not isinstance(choices, list) or "text" not in choices[0]:
            raise ProbeFailed("completion without choices")


def _json_body(resp: httpx.Response, what: str) -> dict:
    if resp.status_code != 200:
        snippet = " ".join(resp.text.split())[:120]
        raise ProbeFailed(f"{what}: HTTP {resp.status_code} {snippet}".rstrip())
    try:
        body = resp.json()
    except ValueError:
        raise ProbeFailed(f"{what}: response is not JSON") from None
    if not isinstance(body, dict):
        raise ProbeFailed(f"{what}: response is not a JSON object")
    return body
