"""The proxy's sections of the configuration schema (``proxy``: tiers, breaker,
admission, client keys, the traffic port's limits), re-exported by ``schema``."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from sentinel.config.base import _Section


class TierKind(StrEnum):
    local = "local"
    openai = "openai"


class TierTimeouts(_Section):
    connect_s: float = Field(1.0, gt=0)
    first_byte_s: float = Field(30.0, gt=0)
    total_s: float = Field(120.0, gt=0)


class TierConfig(_Section):
    name: str
    kind: TierKind = TierKind.openai
    base_url: str | None = None
    api_key_env: str | None = None
    api_key_file: Path | None = None
    model_map: dict[str, str] = Field(default_factory=dict)
    timeouts: TierTimeouts = Field(default_factory=TierTimeouts)
    max_concurrency: int = Field(64, ge=1)
    skip_when_degraded: bool = False

    @model_validator(mode="after")
    def _needs_url(self) -> TierConfig:
        if self.kind == TierKind.openai and not self.base_url:
            raise ValueError(f"tier {self.name!r} of kind 'openai' needs base_url")
        return self


class BreakerConfig(_Section):
    consecutive_failures: int = Field(3, ge=1)
    failure_ratio: float = Field(0.5, gt=0, le=1)
    ratio_window_s: float = Field(30.0, gt=0)
    ratio_min_requests: int = Field(10, ge=1)
    open_initial_s: float = Field(5.0, gt=0)
    open_max_s: float = Field(120.0, gt=0)
    open_multiplier: float = Field(2.0, ge=1)


class AdmissionConfig(_Section):
    max_concurrency: int = Field(64, ge=1)
    queue_timeout_s: float = Field(5.0, ge=0)
    max_queue: int = Field(1024, ge=0)
    spill_waiting_threshold: int | None = Field(None, ge=0)


class AuthConfig(_Section):
    keys_file: Path | None = None
    keys_env: str | None = None
    allow_anonymous: bool = False


class ProxyLimitsConfig(_Section):
    max_request_line_bytes: int = Field(8192, ge=256)
    max_header_bytes: int = Field(32768, ge=1024)
    max_headers: int = Field(100, ge=8)
    header_timeout_s: float = Field(10.0, gt=0)
    body_timeout_s: float = Field(30.0, gt=0)
    keepalive_timeout_s: float = Field(75.0, gt=0)
    send_timeout_s: float = Field(30.0, gt=0)
    max_connections: int = Field(2048, ge=1)
    max_json_depth: int = Field(64, ge=2)


DEFAULT_ALLOWED_ENDPOINTS = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/models",
    "/v1/responses",
    "/v1/responses/*",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
    "/v1/rerank",
    "/v1/score",
]


class ProxyConfig(_Section):
    enabled: bool = True
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=0, le=65535)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    request_timeout_s: float = Field(120.0, gt=0)
    tiers: list[TierConfig] = Field(
        default_factory=lambda: [TierConfig(name="local", kind=TierKind.local)]
    )
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    # --- the traffic port's own request path (issue 15) ---
    limits: ProxyLimitsConfig = Field(default_factory=ProxyLimitsConfig)
    allowed_endpoints: list[str] = Field(default_factory=lambda: list(DEFAULT_ALLOWED_ENDPOINTS))
    stream_idle_timeout_s: float = Field(30.0, gt=0)
    readiness: Literal["local_engine", "any_tier"] = "local_engine"

    @field_validator("allowed_endpoints")
    @classmethod
    def _endpoint_paths(cls, value: list[str]) -> list[str]:
        for ep in value:
            if not ep.startswith("/v1/") or "*" in ep[:-1] or ".." in ep:
                raise ValueError(
                    f"allowed endpoint {ep!r} must be a path under /v1/, optionally ending in /*"
                )
        return value

    @model_validator(mode="after")
    def _unique_tiers(self) -> ProxyConfig:
        names = [t.name for t in self.tiers]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"tier names must be unique, repeated: {sorted(dup)}")
        return self
