"""Building a ``Chain`` of tiers for unit tests: each tier's transport is given (a
``MockTransport``, or Sentinel's own ``RawTransport`` to a fake on loopback), and the
event loop to run them on is asyncio's or uvloop's (production's)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop
from prometheus_client import CollectorRegistry

from sentinel.config.schema import AdmissionConfig, BreakerConfig, TierConfig
from sentinel.proxy.chain import Chain
from sentinel.proxy.metrics import ProxyMetrics
from sentinel.proxy.tier import ProxyRequest, build_tier
from sentinel.proxy.upstream import Transport
from sentinel.state import EngineStatus

T = TypeVar("T")
LOOPS = ["asyncio", "uvloop"]


def run(coro: Coroutine[Any, Any, T], loop: str = "uvloop") -> T:
    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def tier(name: str, transport: Transport, **cfg: Any) -> tuple[TierConfig, Transport]:
    """One tier of ``make_chain``: a non-local tier (``cfg``: more TierConfig fields)."""
    cfg.setdefault("base_url", f"http://{name}.invalid")
    return TierConfig(name=name, **cfg), transport


def make_chain(
    *tiers: tuple[TierConfig, Transport], breaker: dict[str, Any] | None = None
) -> Chain:
    """A chain of the given tiers, in order."""
    metrics = ProxyMetrics(CollectorRegistry())
    bcfg = BreakerConfig(**(breaker or {}))
    acfg = AdmissionConfig()
    built = []
    for cfg, transport in tiers:
        url = str(cfg.base_url)
        built.append(build_tier(cfg, lambda u=url: u, transport, bcfg, acfg, metrics, None))
    return Chain(built, EngineStatus(), acfg, metrics)


def request(
    model: str | None = "m", stream: bool = False, timeout_s: float = 30.0, rid: str = "r1"
) -> ProxyRequest:
    payload: dict[str, Any] = {"model": model, "prompt": "hi", "stream": stream}
    body = json.dumps(payload).encode()
    deadline = asyncio.get_running_loop().time() + timeout_s
    return ProxyRequest(rid, "POST", "/v1/completions", [], body, payload, model, deadline)
