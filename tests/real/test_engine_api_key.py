"""An engine that demands an API key (engine.api_key_env): Sentinel's probes and the
proxy's local tier send it, the engine refuses requests without it, and the key shows in
no `ps` line, no `/status` and no line of Sentinel's log.

One Sentinel for the module; clients authenticate to Sentinel with its own proxy.auth key
(a different one), so the local tier must swap the client's key for the engine's.
"""

from __future__ import annotations

import os
import uuid

import httpx
import psutil
import pytest

from tests.helpers import wait_for
from tests.real.conftest import SHARED_OVERRIDES, SentinelFactory
from tests.real.harness import ENGINE_START_TIMEOUT, SentinelProcess

pytestmark = pytest.mark.real

MARK = uuid.uuid4().hex
ENGINE_KEY = f"sk-engine-{MARK}"
CLIENT_KEY = f"sk-client-{MARK}"
ENV = {"SENTINEL_TEST_ENGINE_KEY": ENGINE_KEY, "SENTINEL_TEST_CLIENT_KEYS": f"team:{CLIENT_KEY}"}


@pytest.fixture(scope="module")
def sentinel(sentinel_factory: SentinelFactory) -> SentinelProcess:
    overrides = {
        **SHARED_OVERRIDES,
        "engine": {"api_key_env": "SENTINEL_TEST_ENGINE_KEY"},
        "proxy": {"auth": {"keys_env": "SENTINEL_TEST_CLIENT_KEYS"}},
    }
    saved = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)  # Sentinel's subprocess inherits the test's environment
    try:
        s = sentinel_factory(overrides, name="engine-api-key")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return s


def _complete(url: str, key: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 4, "temperature": 0}
    return httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=30)


def test_keyed_engine_is_ready_and_served_through_the_proxy(sentinel: SentinelProcess) -> None:
    def ready() -> bool:
        sentinel.assert_running()
        try:
            return sentinel.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    # ready means the inference probe (a real completion, with the engine's key) passed
    wait_for(ready, ENGINE_START_TIMEOUT, interval=1.0, what="Sentinel ready on a keyed engine")
    r = _complete(sentinel.proxy_url, CLIENT_KEY)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] is not None
    # the engine itself refuses a request without its key, and one with the client's key
    assert _complete(sentinel.engine_url, None).status_code == 401
    assert _complete(sentinel.engine_url, CLIENT_KEY).status_code == 401
    assert _complete(sentinel.engine_url, ENGINE_KEY).status_code == 200
    # the proxy still refuses a client without Sentinel's key
    assert _complete(sentinel.proxy_url, None).status_code == 401
    status = sentinel.get("/status")
    assert status.json()["state"] == "ready"
    assert ENGINE_KEY not in status.text
    # no restart: the probes never failed on the key
    assert status.json()["generation"] == 1, status.text
    # the engine's /metrics is open: Sentinel scrapes it without the key
    wait_for(
        lambda: "vllm_generation_tokens_total" in sentinel.get("/metrics").text,
        60,
        what="the engine's series on /metrics",
    )
    metrics = sentinel.get("/metrics").text
    assert ENGINE_KEY not in metrics
    # launch mode exports no sentinel_attach_* series: the attach alerts cannot fire here
    assert "sentinel_attach_" not in metrics


def test_the_key_is_in_no_argv_and_no_log(sentinel: SentinelProcess) -> None:
    procs = sentinel.engine_tree()
    assert procs
    for p in [*procs, psutil.Process(sentinel.sentinel_pid())]:
        assert ENGINE_KEY not in " ".join(p.cmdline()), p.pid
    # the engine gets it from its environment, as VLLM_API_KEY
    assert any(p.environ().get("VLLM_API_KEY") == ENGINE_KEY for p in procs)
    assert ENGINE_KEY not in sentinel.log_text()
