"""A tier of the degradation chain (``Tier``): one upstream with its breaker, its slots
(admission control for the local engine, a concurrency limit for the others), its
timeouts, and what it is sent (model map, API key); and the request walked through the
chain (``ProxyRequest``).

What a tier is sent: a tier with a model map gets the model name it maps to; a tier
with an API key gets that key as its bearer token; a tier other than the local engine
without one gets no ``Authorization`` at all (a client's key never reaches a third
party).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sentinel.config.schema import AdmissionConfig, BreakerConfig, TierConfig, TierKind
from sentinel.proxy.admission import Admission
from sentinel.proxy.breaker import Breaker, BreakerState
from sentinel.proxy.metrics import ProxyMetrics
from sentinel.proxy.secrets import Secret
from sentinel.proxy.upstream import Transport, UpstreamRequest

# hop reasons of a tier with a model map (``Tier.model_refusal``)
MODEL_NOT_OFFERED = "model_not_offered"
MODEL_UNREADABLE = "model_unreadable"


@dataclass(slots=True)
class ProxyRequest:
    request_id: str
    method: str
    target: str  # raw path + query string, forwarded as is
    headers: list[tuple[bytes, bytes]]  # client headers fit to forward (lower-case names)
    body: bytes
    payload: dict[str, Any] | None  # the parsed JSON body, when it is JSON
    model: str | None
    deadline: float  # loop.time() by which the whole request must end
    hops: list[tuple[str, str]] = field(default_factory=list)
    # the loop the request runs on, looked up once (not its task: a task held here
    # would make a reference cycle through its own frame, left to the cyclic GC)
    loop: asyncio.AbstractEventLoop | None = None


class Tier:
    def __init__(
        self,
        cfg: TierConfig,
        base_url: Callable[[], str],
        transport: Transport,
        breaker: Breaker,
        api_key: Secret | None,
        admission: Admission | None,
    ) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.local = cfg.kind == TierKind.local
        self.base_url = base_url
        self.transport = transport
        self.breaker = breaker
        self.api_key = api_key
        self.admission = admission
        self.limit = cfg.max_concurrency
        self.in_flight = 0
        self.timeouts = cfg.timeouts

    def url_base(self) -> str:
        return self.base_url().rstrip("/")

    # ---- slots ---------------------------------------------------------------------
    def in_use(self) -> int:
        return self.admission.in_flight if self.admission is not None else self.in_flight

    def try_acquire(self) -> bool:
        """Take a slot if one is free now (no waiting in the admission queue)."""
        adm = self.admission
        if adm is not None:
            return adm.try_acquire()
        if self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        return True

    def release(self) -> None:
        if self.admission is not None:
            self.admission.release()
        else:
            self.in_flight -= 1

    # ---- what it is sent -------------------------------------------------------------
    def model_refusal(self, req: ProxyRequest) -> str | None:
        """Why this tier is not offered ``req``'s model, or None. With a model map, only
        the models it names are offered (``model_not_offered``), and a body whose model
        Sentinel cannot read (not JSON: a multipart upload) is not sent either
        (``model_unreadable``): the tier's key is never spent on a model it was not
        offered. A request without a body or model (``GET /v1/models``) always is."""
        model_map = self.cfg.model_map
        if not model_map:
            return None
        model = req.model
        if model is None:
            return MODEL_UNREADABLE if req.body and req.payload is None else None
        return None if model in model_map else MODEL_NOT_OFFERED

    def body_for(self, req: ProxyRequest) -> bytes:
        mapped = self.cfg.model_map.get(req.model) if req.model is not None else None
        if mapped is None or req.payload is None:
            return req.body
        return json.dumps({**req.payload, "model": mapped}).encode()

    def headers_for(self, req: ProxyRequest) -> list[tuple[bytes, bytes]]:
        if self.api_key is not None or not self.local:
            # the tier's own key, or none: never hand a client's key to a third party
            headers = [(k, v) for k, v in req.headers if k != b"authorization"]
            if self.api_key is not None:
                headers.append((b"authorization", self.api_key.bearer()))
        else:
            headers = req.headers.copy()
        headers.append((b"x-request-id", req.request_id.encode()))
        return headers

    def upstream_request(self, req: ProxyRequest) -> UpstreamRequest:
        return UpstreamRequest(
            req.method,
            self.url_base(),
            req.target,
            self.headers_for(req),
            self.body_for(req),
            self.timeouts.connect_s,
        )

    # ---- deadlines -------------------------------------------------------------------
    def first_byte_deadline(self, req: ProxyRequest, started: float) -> float:
        """The loop time by which this tier's answer to ``req`` must have begun."""
        t = self.timeouts
        return min(started + t.first_byte_s, started + t.total_s, req.deadline)

    def total_deadline(self, req: ProxyRequest, started: float) -> float:
        """The loop time by which this tier's whole answer to ``req`` must have ended."""
        return min(started + self.timeouts.total_s, req.deadline)


def build_tier(
    cfg: TierConfig,
    base_url: Callable[[], str],
    transport: Transport,
    breaker_cfg: BreakerConfig,
    admission_cfg: AdmissionConfig,
    metrics: ProxyMetrics,
    api_key: Secret | None,
) -> Tier:
    def on_change(b: Breaker, state: BreakerState) -> None:
        metrics.breaker_state.labels(b.name).set(int(state))
        metrics.breaker_transitions.labels(b.name, state.name).inc()

    breaker = Breaker(cfg.name, breaker_cfg, on_change=on_change)
    admission = None
    if cfg.kind == TierKind.local:
        admission = Admission(
            min(cfg.max_concurrency, admission_cfg.max_concurrency),
            admission_cfg.max_queue,
            admission_cfg.queue_timeout_s,
        )
    return Tier(cfg, base_url, transport, breaker, api_key, admission)
