"""The inference probe against a fake engine: success, timeout, refusal, errors, API key."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from sentinel.config.schema import EngineConfig
from sentinel.probes.inference import InferenceProbe, configured_model_name, engine_api_key
from tests.helpers import free_port


@pytest.fixture(autouse=True)
def _reset(engine):
    engine.mode.update(delay=0.0, status=None)
    engine.requests.clear()


def run_probe(url: str, **kw):
    async def go():
        async with httpx.AsyncClient(trust_env=False) as client:
            probe = InferenceProbe(
                client, prompt=kw.pop("prompt", "hi"), timeout_s=kw.pop("timeout_s", 2.0), **kw
            )
            return await probe.run(url)

    return asyncio.run(go())


def test_success_sends_one_token_completion_with_the_fixed_prompt(engine):
    result = run_probe(engine.url, model="tiny", prompt="ping")
    assert result.ok, result.detail
    assert result.name == "inference"
    assert result.latency_s is not None and 0 < result.latency_s < 2
    (req,) = engine.paths("/v1/completions")
    assert req["body"]["max_tokens"] == 1
    assert req["body"]["prompt"] == "ping"
    assert req["body"]["model"] == "tiny"
    assert not engine.paths("/v1/models")  # configured name: no lookup


def test_model_name_comes_from_v1_models_when_not_configured(engine):
    result = run_probe(engine.url, model=None)
    assert result.ok, result.detail
    assert len(engine.paths("/v1/models")) == 1
    assert engine.paths("/v1/completions")[0]["body"]["model"] == "tiny"


def test_hung_engine_fails_within_the_timeout(engine):
    engine.mode["delay"] = 5.0
    t0 = time.monotonic()
    result = run_probe(engine.url, model="tiny", timeout_s=0.3)
    took = time.monotonic() - t0
    assert not result.ok
    assert "timed out after 0.3s" in result.detail
    assert took < 1.5


def test_connection_refused_is_a_failure_not_an_exception():
    result = run_probe(f"http://127.0.0.1:{free_port()}", model="tiny")
    assert not result.ok
    assert "connection refused" in result.detail


def test_http_error_is_reported_with_status(engine):
    engine.mode["status"] = 500
    result = run_probe(engine.url, model="tiny")
    assert not result.ok
    assert "HTTP 500" in result.detail


def test_wrong_model_name_fails_with_the_engines_answer(engine):
    result = run_probe(engine.url, model="other")
    assert not result.ok
    assert "HTTP 404" in result.detail


def test_api_key_is_sent_as_bearer(engine):
    run_probe(engine.url, model="tiny", api_key="sk-test-123456789")
    (req,) = engine.paths("/v1/completions")
    assert req["headers"]["authorization"] == "Bearer sk-test-123456789"


def test_engine_api_key_sources():
    assert engine_api_key(EngineConfig(args=["--api-key", "k1"]), environ={}) == "k1"
    assert engine_api_key(EngineConfig(args=["--api-key=k2"]), environ={}) == "k2"
    assert engine_api_key(EngineConfig(env={"VLLM_API_KEY": "k3"}), environ={}) == "k3"
    assert engine_api_key(EngineConfig(), environ={"VLLM_API_KEY": "k4"}) == "k4"
    assert engine_api_key(EngineConfig(), environ={}) is None


def test_configured_model_name():
    assert configured_model_name(EngineConfig(served_model_name="tiny")) == "tiny"
    assert configured_model_name(EngineConfig()) is None
    # a verbatim command may serve another name: ask the engine
    verbatim = EngineConfig(served_model_name="tiny", command=["vllm", "serve", "x"])
    assert configured_model_name(verbatim) is None
