"""The engine's environment: an allowlist of Sentinel's variables plus engine.env, and
never a variable the config reads a secret from."""

from __future__ import annotations

from sentinel.config import load_config
from sentinel.config.schema import EngineConfig, SentinelConfig
from sentinel.engine.command import build_env, inherited, secret_env_names

SENTINEL_ENV = {
    "PATH": "/usr/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "CUDA_VISIBLE_DEVICES": "0,1",
    "NCCL_DEBUG": "INFO",
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "HF_TOKEN": "hf_secret_for_the_hub",
    "HF_HOME": "/models",
    "PYTHONPATH": "/src",
    "OMP_NUM_THREADS": "4",
    "TORCH_HOME": "/cache",
    "OPENAI_API_KEY": "sk-external-tier-key",
    "AWS_SECRET_ACCESS_KEY": "aws-secret",
    "DATABASE_URL": "postgres://user:pw@db/x",
    "SENTINEL_ENGINE__PORT": "9000",
    "SENTINEL_PROXY__API_KEY": "whatever",
}


def test_only_the_allowlist_reaches_the_engine() -> None:
    env = build_env(EngineConfig(), base=SENTINEL_ENV)
    for name in ("PATH", "HOME", "LANG", "LC_ALL", "CUDA_VISIBLE_DEVICES", "NCCL_DEBUG"):
        assert env[name] == SENTINEL_ENV[name]
    for name in ("VLLM_CPU_KVCACHE_SPACE", "HF_TOKEN", "HF_HOME", "PYTHONPATH", "TORCH_HOME"):
        assert env[name] == SENTINEL_ENV[name]
    assert env["OMP_NUM_THREADS"] == "4"
    for name in ("OPENAI_API_KEY", "AWS_SECRET_ACCESS_KEY", "DATABASE_URL"):
        assert name not in env
    assert not [n for n in env if n.startswith("SENTINEL_")]
    assert env["PYTHONUNBUFFERED"] == "1"


def test_engine_env_is_added_and_wins() -> None:
    cfg = EngineConfig(env={"VLLM_CPU_KVCACHE_SPACE": "1", "MY_FLAG": "on"})
    env = build_env(cfg, base=SENTINEL_ENV)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert env["MY_FLAG"] == "on"


def test_withheld_names_never_pass_even_when_allowlisted_or_set_in_engine_env() -> None:
    cfg = EngineConfig(env={"OPENAI_API_KEY": "from-engine-env"})
    env = build_env(cfg, base=SENTINEL_ENV, withhold={"HF_TOKEN", "OPENAI_API_KEY"})
    assert "HF_TOKEN" not in env  # matches HF_* but a secret's source
    assert "OPENAI_API_KEY" not in env
    assert env["HF_HOME"] == "/models"


def test_operators_extend_the_list_by_name_or_prefix() -> None:
    cfg = EngineConfig(inherit_env=["PATH", "MYCO_*", "DATABASE_URL"])
    env = build_env(cfg, base={**SENTINEL_ENV, "MYCO_REGION": "eu", "MYCOX": "no"})
    assert env["MYCO_REGION"] == "eu"
    assert env["DATABASE_URL"] == SENTINEL_ENV["DATABASE_URL"]
    assert "MYCOX" not in env and "HOME" not in env
    assert set(env) == {"PATH", "MYCO_REGION", "DATABASE_URL", "PYTHONUNBUFFERED"}


def test_pattern_matching() -> None:
    assert inherited("LC_TIME", ["LC_*"])
    assert inherited("TORCHINDUCTOR_CACHE_DIR", ["TORCH*"])
    assert not inherited("PATHX", ["PATH"])
    assert not inherited("XPATH", ["PATH*"])


def test_secret_env_names_are_every_tier_key_variable() -> None:
    cfg = SentinelConfig.model_validate(
        {
            "proxy": {
                "tiers": [
                    {"name": "local", "kind": "local"},
                    {"name": "b", "base_url": "http://b:1", "api_key_env": "BACKUP_KEY"},
                    {"name": "x", "base_url": "https://x", "api_key_env": "OPENAI_API_KEY"},
                ]
            }
        }
    )
    assert secret_env_names(cfg) == {"BACKUP_KEY", "OPENAI_API_KEY"}


def test_the_documented_default_list_is_the_schema_default() -> None:
    assert load_config(None, environ={}).engine.inherit_env == EngineConfig().inherit_env
