"""The engine's configuration sections: ``engine`` (launch or attach) and ``supervisor``.

Split out of ``schema.py`` (which re-exports every name here) for issue 18's attach mode.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from sentinel.config.base import _Section


class OnFailed(StrEnum):
    stay = "stay"
    exit = "exit"


# What the engine inherits from Sentinel's environment (names; a trailing * is a prefix).
# default.yaml lists the same names (a test checks that they agree).
# fmt: off
DEFAULT_INHERIT_ENV = (
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "LC_*", "TZ", "TERM",
    "TMPDIR", "HOSTNAME", "LD_LIBRARY_PATH", "LD_PRELOAD", "PYTHON*", "VIRTUAL_ENV",
    "CUDA_*", "NVIDIA_*", "NCCL_*", "CUBLAS_*", "CUDNN_*", "NVTE_*", "TRITON_*",
    "VLLM_*", "HF_*", "HUGGING_FACE_*", "TRANSFORMERS_*", "TOKENIZERS_*", "TORCH*",
    "PYTORCH_*", "OMP_*", "MKL_*", "KMP_*", "XDG_*", "SSL_CERT_*", "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy",
    "no_proxy", "RAY_*", "GLOO_*", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "RANK",
    "WORLD_SIZE", "ROCM_*", "HIP_*", "HSA_*",
)
# fmt: on


class EngineMode(StrEnum):
    launch = "launch"  # Sentinel starts the engine and owns its process tree
    attach = "attach"  # the engine runs already (a sidecar): Sentinel guards it by URL and pids


class AttachConfig(_Section):
    """engine.attach: an engine Sentinel did not launch (engine.mode: attach)."""

    base_url: str | None = None
    pid_file: Path | None = None
    api_server_match: list[str] = Field(
        default_factory=lambda: [
            "vllm.entrypoints.openai.api_server",
            "vllm serve",
            "VLLM::APIServer",
        ]
    )
    engine_core_title: str = Field("VLLM::EngineCore", min_length=1)
    worker_title: str = Field("VLLM::Worker", min_length=1)
    discover_interval_s: float = Field(2.0, gt=0)
    recovery: bool = True
    term_grace_s: float = Field(10.0, ge=0)
    kill_wait_s: float = Field(5.0, gt=0)
    recovery_holdoff_s: float = Field(120.0, ge=0)
    startup_grace_s: float | None = Field(None, gt=0)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http(s) URL such as http://127.0.0.1:8001, got {v!r}")
        if parts.username or parts.password:
            raise ValueError("must not hold credentials (user:password@): they would reach logs")
        if parts.query or parts.fragment:
            raise ValueError(
                "must not have a query or fragment (?...#...): a token there would reach "
                "logs and /status; give the engine's base URL only"
            )
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as exc:
            raise ValueError(f"bad port in {v!r}: {exc}") from None
        return v.rstrip("/")

    @field_validator("api_server_match")
    @classmethod
    def _no_empty_pattern(cls, v: list[str]) -> list[str]:
        if not v or any(not p.strip() for p in v):
            raise ValueError("needs at least one non-empty command-line substring")
        return v


class EngineConfig(_Section):
    mode: EngineMode = EngineMode.launch
    model: str = "var/tiny-model"
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(8001, ge=1, le=65535)
    python: str | None = None
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    inherit_env: list[str] = Field(default_factory=lambda: list(DEFAULT_INHERIT_ENV))
    command: list[str] = Field(default_factory=list)
    workdir: Path | None = None
    gpu_indices: list[int] = Field(default_factory=list)
    # the variable holding the engine's own API key (vLLM --api-key), sentinel/engine/apikey.py
    api_key_env: str | None = None
    attach: AttachConfig = Field(default_factory=AttachConfig)

    @model_validator(mode="after")
    def _one_engine_key(self) -> EngineConfig:
        # vLLM prefers --api-key over VLLM_API_KEY: the probes would send the wrong key
        if self.api_key_env and any(
            a == "--api-key" or a.startswith("--api-key=") for a in (*self.args, *self.command)
        ):
            raise ValueError(
                "api_key_env is set and engine.args/command hold --api-key: give the engine's "
                "key one way (api_key_env keeps it out of `ps`)"
            )
        return self

    def attach_url(self) -> str:
        """The attached engine's base URL: engine.attach.base_url, else engine.host/port."""
        from sentinel.net import local_url

        return self.attach.base_url or local_url(self.host, self.port)

    def attach_host(self) -> str | None:
        """The attached engine's host name or address (to tell a remote engine)."""
        return urlsplit(self.attach_url()).hostname

    def attach_port(self) -> int | None:
        """The attached engine's port (to tell its API server from other engines')."""
        if self.attach.base_url is None:
            return self.port
        parts = urlsplit(self.attach.base_url)
        return parts.port or (443 if parts.scheme == "https" else 80)


class SupervisorConfig(_Section):
    backoff_initial_s: float = Field(1.0, gt=0)
    backoff_max_s: float = Field(60.0, gt=0)
    backoff_multiplier: float = Field(2.0, ge=1.0)
    backoff_jitter: float = Field(0.2, ge=0.0, le=1.0)
    crash_loop_max_starts: int = Field(5, ge=1)
    crash_loop_window_s: float = Field(300.0, gt=0)
    stop_grace_s: float = Field(20.0, ge=0)
    kill_grace_s: float = Field(0.5, ge=0)
    startup_timeout_s: float = Field(900.0, gt=0)
    on_failed: OnFailed = OnFailed.stay
    log_tail_lines: int = Field(200, ge=10, le=100_000)
    kill_foreign_gpu_processes: bool = False
    evidence_timeout_s: float = Field(5.0, ge=0)

    @model_validator(mode="after")
    def _backoff_order(self) -> SupervisorConfig:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(
                "backoff_max_s must be >= backoff_initial_s "
                f"(got {self.backoff_max_s} < {self.backoff_initial_s})"
            )
        return self
