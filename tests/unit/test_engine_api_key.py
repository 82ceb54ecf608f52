"""engine.api_key_env: the engine's own key is read from Sentinel's environment, checked,
hidden, handed to vLLM through its environment, sent by the probe and by the local tier
(in place of the client's key), and scrubbed from incident bundles."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from sentinel.config.schema import EngineConfig, SentinelConfig
from sentinel.engine.apikey import key_env_extender, load_engine_key
from sentinel.incidents.snapshot import secret_values
from sentinel.probes.inference import engine_api_key
from sentinel.proxy.secrets import SecretError
from tests.fake_openai import FakeOpenAI
from tests.unit.proxy_harness import ProxyHarness

KEY = "sk-engine-0123456789abcdef"


def test_unset_means_no_key() -> None:
    assert load_engine_key(EngineConfig(), {}) is None


def test_the_key_is_read_and_never_printed() -> None:
    key = load_engine_key(EngineConfig(api_key_env="ENG_KEY"), {"ENG_KEY": f" {KEY}\n"})
    assert key is not None and key.reveal() == KEY
    assert KEY not in repr(key) and KEY not in str(key)


@pytest.mark.parametrize("env", [{}, {"ENG_KEY": "  "}])
def test_a_missing_variable_is_named(env: dict[str, str]) -> None:
    with pytest.raises(SecretError, match="engine.api_key_env: environment variable ENG_KEY"):
        load_engine_key(EngineConfig(api_key_env="ENG_KEY"), env)


def test_a_key_that_would_split_a_header_is_refused_without_showing_it() -> None:
    with pytest.raises(SecretError) as info:
        load_engine_key(EngineConfig(api_key_env="ENG_KEY"), {"ENG_KEY": "abc\r\nX-Evil: 1"})
    assert "ENG_KEY" in str(info.value) and "Evil" not in str(info.value)


def test_the_probe_sends_the_configured_key_first() -> None:
    cfg = EngineConfig(api_key_env="ENG_KEY", env={"VLLM_API_KEY": "other"})
    assert engine_api_key(cfg, {"ENG_KEY": KEY}) == KEY
    assert engine_api_key(EngineConfig(), {"VLLM_API_KEY": "legacy"}) == "legacy"


def test_launch_mode_hands_the_key_to_vllm_in_its_environment() -> None:
    key = load_engine_key(EngineConfig(api_key_env="ENG_KEY"), {"ENG_KEY": KEY})
    assert key is not None
    env: dict[str, str] = {"PATH": "/bin"}
    key_env_extender(key)(env)
    assert env == {"PATH": "/bin", "VLLM_API_KEY": KEY}


def test_incident_bundles_scrub_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLAIN_VAR_NAME", KEY)  # a name no secret pattern would catch
    cfg = SentinelConfig.model_validate({"engine": {"api_key_env": "PLAIN_VAR_NAME"}})
    assert KEY in secret_values(cfg)


def test_the_local_tier_swaps_the_clients_key_for_the_engines(tmp_path: Path) -> None:
    client_key = "sk-client-0123456789abcdef"
    with FakeOpenAI("engine", model="m") as engine, FakeOpenAI("ext", model="m") as ext:
        tiers = [{"name": "local", "kind": "local"}, {"name": "ext", "base_url": ext.url}]
        proxy = {"tiers": tiers, "auth": {"keys_env": "TEST_CLIENT_KEYS"}}
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("TEST_CLIENT_KEYS", f"team:{client_key}")
            harness = ProxyHarness(proxy, tmp_path, engine_url=engine.url, engine_api_key=KEY)
            with harness as h:
                body = {"model": "m", "prompt": "hi", "max_tokens": 1}
                auth = {"Authorization": f"Bearer {client_key}"}
                r = httpx.post(h.url + "/v1/completions", json=body, headers=auth, timeout=10)
                assert r.status_code == 200, r.text
                assert r.headers["x-sentinel-upstream"] == "local"
                assert engine.requests[-1]["headers"]["authorization"] == f"Bearer {KEY}"
                engine.mode["status"] = 503  # the next tier never gets the engine's key
                r = httpx.post(h.url + "/v1/completions", json=body, headers=auth, timeout=10)
                assert r.headers["x-sentinel-upstream"] == "ext", r.text
                assert "authorization" not in ext.requests[-1]["headers"]


def test_the_key_given_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="api_key_env is set and engine.args/command hold"):
        EngineConfig(api_key_env="ENG_KEY", args=["--api-key", "x"])
