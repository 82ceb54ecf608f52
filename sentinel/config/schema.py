"""The configuration schema: one pydantic model per section, unknown keys refused.

Every key here is documented in ``default.yaml`` (the embedded default); a test
checks that the two agree key for key.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from sentinel.config.base import _Section

# the engine's sections (issue 18: attach mode) and the proxy's live in their own
# modules; re-exported
from sentinel.config.engine import (
    DEFAULT_INHERIT_ENV,
    AttachConfig,
    EngineConfig,
    EngineMode,
    OnFailed,
    SupervisorConfig,
)
from sentinel.config.proxy import (
    DEFAULT_ALLOWED_ENDPOINTS,
    AdmissionConfig,
    AuthConfig,
    BreakerConfig,
    ProxyConfig,
    ProxyLimitsConfig,
    TierConfig,
    TierKind,
    TierTimeouts,
)

__all__ = [
    "DEFAULT_ALLOWED_ENDPOINTS",
    "DEFAULT_INHERIT_ENV",
    "AdmissionConfig",
    "AttachConfig",
    "AuthConfig",
    "BreakerConfig",
    "EngineConfig",
    "EngineMode",
    "OnFailed",
    "ProxyConfig",
    "ProxyLimitsConfig",
    "SupervisorConfig",
    "TierConfig",
    "TierKind",
    "TierTimeouts",
]


class ProbeAction(StrEnum):
    report = "report"
    restart = "restart"


class ProbesConfig(_Section):
    interval_s: float = Field(2.0, gt=0)
    timeout_s: float = Field(3.0, gt=0)
    freshness_s: float = Field(10.0, gt=0)
    prompt: str = "hi"
    metrics_interval_s: float = Field(2.0, gt=0)
    stall_window_s: float = Field(30.0, gt=0)
    on_stall: ProbeAction = ProbeAction.restart
    stall_restart_after_s: float = Field(60.0, ge=0)
    on_not_ready: ProbeAction = ProbeAction.restart
    not_ready_restart_after_s: float = Field(300.0, ge=0)


class EngineMetricNames(StrEnum):
    promtool = "promtool"
    verbatim = "verbatim"


class AdminConfig(_Section):
    token_file: Path | None = None
    token_env: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> AdminConfig:
        if self.token_file and self.token_env:
            raise ValueError("set only one of token_file and token_env")
        return self


class OpsLimitsConfig(_Section):
    """What one client connection may do on the ops port (the traffic port's limits)."""

    max_request_line_bytes: int = Field(8192, ge=256)
    max_header_bytes: int = Field(32768, ge=1024)
    max_headers: int = Field(100, ge=8)
    max_body_bytes: int = Field(1024 * 1024, ge=1024)
    header_timeout_s: float = Field(10.0, gt=0)
    body_timeout_s: float = Field(10.0, gt=0)
    keepalive_timeout_s: float = Field(30.0, gt=0)
    send_timeout_s: float = Field(30.0, gt=0)
    max_connections: int = Field(256, ge=1)
    max_connections_per_client: int = Field(32, ge=0)


class OpsConfig(_Section):
    host: str = "0.0.0.0"
    port: int = Field(8090, ge=0, le=65535)
    passthrough_engine_metrics: bool = True
    engine_metric_names: EngineMetricNames = EngineMetricNames.promtool
    livez_heartbeat_timeout_s: float = Field(5.0, gt=0)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    limits: OpsLimitsConfig = Field(default_factory=OpsLimitsConfig)


class GpuMode(StrEnum):
    auto = "auto"
    on = "on"
    off = "off"


ClocksEventReason = Literal[
    "GPU_IDLE",
    "APPLICATIONS_CLOCKS_SETTING",
    "SW_POWER_CAP",
    "HW_SLOWDOWN",
    "SYNC_BOOST",
    "SW_THERMAL",
    "HW_THERMAL",
    "HW_POWER_BRAKE",
    "DISPLAY_CLOCKS",
]


class GpuDegradedConfig(_Section):
    temperature_c: float = Field(82.0, gt=0)
    throttle_reasons: list[ClocksEventReason] = Field(
        default_factory=lambda: ["HW_THERMAL", "HW_POWER_BRAKE", "HW_SLOWDOWN"]
    )
    on_xid: bool = True
    xid_hold_s: float = Field(60.0, ge=0)


class GpuConfig(_Section):
    mode: GpuMode = GpuMode.auto
    poll_interval_s: float = Field(1.0, gt=0)
    slow_counters_interval_s: float = Field(10.0, gt=0)
    degraded: GpuDegradedConfig = Field(default_factory=GpuDegradedConfig)

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: object) -> object:
        # YAML 1.1 reads a bare `on` / `off` as true / false
        return ("on" if value else "off") if isinstance(value, bool) else value


class PayloadLogConfig(_Section):
    enabled: bool = True
    dir: Path = Path("var/payloads")
    sample_rate: float = Field(0.01, ge=0, le=1)
    log_errors: bool = True
    error_sample_rate: float = Field(1.0, ge=0, le=1)
    max_error_bodies_per_s: float = Field(10.0, ge=0)
    max_record_bytes: int = Field(64 * 1024, ge=256)
    max_file_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_total_bytes: int = Field(256 * 1024 * 1024, ge=1024)
    redact_patterns: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _budget(self) -> PayloadLogConfig:
        if self.max_total_bytes < self.max_file_bytes:
            raise ValueError("max_total_bytes must be >= max_file_bytes")
        return self


class LogFormat(StrEnum):
    auto = "auto"
    json = "json"
    console = "console"


class LoggingConfig(_Section):
    level: str = Field("info", pattern=r"^(?i:debug|info|warning|error|critical)$")
    format: LogFormat = LogFormat.auto
    engine_lines: bool = True


class RuntimeConfig(_Section):
    gc_freeze: bool = True
    gc_young_threshold: int = Field(50_000, ge=100)


# --- incidents and watchdogs (issue 17) ---
class IncidentsConfig(_Section):
    dir: Path = Path("var/incidents")
    max_count: int = Field(50, ge=1)
    max_total_bytes: int = Field(512 * 1024 * 1024, ge=64 * 1024)
    max_bundle_bytes: int = Field(32 * 1024 * 1024, ge=64 * 1024)
    log_lines: int = Field(500, ge=10, le=100_000)

    @model_validator(mode="after")
    def _budget(self) -> IncidentsConfig:
        if self.max_total_bytes < self.max_bundle_bytes:
            raise ValueError("max_total_bytes must be >= max_bundle_bytes")
        return self


class WatchdogPolicy(StrEnum):
    report = "report"
    restart = "restart"


class DumpConfig(_Section):
    py_spy: str | None = None
    native: bool = False
    nonblocking: bool = False
    timeout_s: float = Field(5.0, gt=0, le=120)
    min_interval_s: float = Field(60.0, ge=0)

    @model_validator(mode="after")
    def _native_blocks(self) -> DumpConfig:
        if self.native and self.nonblocking:
            raise ValueError("native and nonblocking exclude each other (py-spy refuses both)")
        return self


class AgentConfig(_Section):
    enabled: bool = True
    report_interval_s: float = Field(1.0, gt=0, le=60)
    tracked_objects_interval_s: float = Field(600.0, ge=0)
    gc_thresholds: list[int] = Field(default_factory=list, max_length=3)
    gc_freeze_after_s: float | None = Field(None, ge=0)


class GcWatchdogConfig(_Section):
    pause_limit_s: float = Field(1.0, gt=0)


class LeakWatchdogConfig(_Section):
    enabled: bool = True
    interval_s: float = Field(10.0, gt=0)
    window_s: float = Field(1800.0, gt=0)
    min_samples: int = Field(10, ge=3)
    growth_limit_bytes_per_hour: float = Field(1024**3, gt=0)
    time_to_limit_limit_s: float = Field(6 * 3600.0, gt=0)
    policy: WatchdogPolicy = WatchdogPolicy.report
    quiet_max_running: int = Field(0, ge=0)
    quiet_max_wait_s: float = Field(600.0, ge=0)


class StuckWatchdogConfig(_Section):
    enabled: bool = True
    interval_s: float = Field(2.0, gt=0)
    cpu_busy_ratio: float = Field(0.9, gt=0, le=64)
    gpu_idle_ratio: float = Field(0.05, ge=0, le=1)
    for_s: float = Field(30.0, ge=0)
    cpu_only: bool = False
    capture_on_stall: bool = True
    capture_on_not_ready: bool = True
    policy: WatchdogPolicy = WatchdogPolicy.report


class WatchdogsConfig(_Section):
    dump: DumpConfig = Field(default_factory=DumpConfig)
    agent: AgentConfig = Field(default_factory=AgentConfig)
    gc: GcWatchdogConfig = Field(default_factory=GcWatchdogConfig)
    leak: LeakWatchdogConfig = Field(default_factory=LeakWatchdogConfig)
    stuck: StuckWatchdogConfig = Field(default_factory=StuckWatchdogConfig)


class PreemptionConfig(_Section):
    file: Path | None = None
    url: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    match: str = ""
    poll_interval_s: float = Field(5.0, gt=0)
    timeout_s: float = Field(2.0, gt=0)

    @field_validator("match")
    @classmethod
    def _regex(cls, value: str) -> str:
        import re

        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"match is not a valid regular expression: {exc}") from None
        return value

    @field_validator("url")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {value!r}")
        return value


class LifecycleConfig(_Section):
    drain_timeout_s: float = Field(30.0, ge=0)
    drain_retry_after_s: float = Field(5.0, ge=0)
    drain_fallback: bool = True
    engine_grace_after_drain_s: float = Field(0.1, ge=0)
    vllm_shutdown_timeout: bool = True
    runtime_dir: Path | None = None
    gpu_release_timeout_s: float = Field(30.0, ge=0)
    unkillable_after_s: float = Field(5.0, gt=0)
    livez_fails_on_unkillable: bool = True
    preemption: PreemptionConfig = Field(default_factory=PreemptionConfig)


class SentinelConfig(_Section):
    engine: EngineConfig = Field(default_factory=EngineConfig)
    supervisor: SupervisorConfig = Field(default_factory=SupervisorConfig)
    probes: ProbesConfig = Field(default_factory=ProbesConfig)
    ops: OpsConfig = Field(default_factory=OpsConfig)
    gpu: GpuConfig = Field(default_factory=GpuConfig)
    proxy: ProxyConfig = Field(default_factory=ProxyConfig)
    payload_log: PayloadLogConfig = Field(default_factory=PayloadLogConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    incidents: IncidentsConfig = Field(default_factory=IncidentsConfig)  # issue 17
    watchdogs: WatchdogsConfig = Field(default_factory=WatchdogsConfig)  # issue 17
    lifecycle: LifecycleConfig = Field(default_factory=LifecycleConfig)
