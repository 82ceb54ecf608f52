"""The real engine's environment: Sentinel's secrets never reach vLLM's processes.

One Sentinel for the module, started with secrets in its own environment: a variable
named by a tier's ``api_key_env`` (chosen to match the ``VLLM_*`` allowlist pattern, so
only the withholding keeps it out), a second tier's key under an ordinary name, and an
unrelated secret no allowlist entry names. Each engine process (API server, EngineCore,
Worker) is read through ``/proc/<pid>/environ``.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from tests.helpers import free_port, wait_for
from tests.real.conftest import SHARED_OVERRIDES, SentinelFactory
from tests.real.harness import ENGINE_START_TIMEOUT, SentinelProcess

pytestmark = pytest.mark.real

MARK = uuid.uuid4().hex
SECRETS = {
    "VLLM_TEST_TIER_KEY": f"sk-tier-backup-{MARK}",
    "EXTERNAL_TEST_API_KEY": f"sk-tier-external-{MARK}",
    "UNRELATED_TEST_PASSWORD": f"pw-{MARK}",
}
INHERITED = {"OMP_TEST_SETTING": f"omp-{MARK}"}


@pytest.fixture(scope="module")
def sentinel(sentinel_factory: SentinelFactory) -> SentinelProcess:
    overrides = {
        **SHARED_OVERRIDES,
        "engine": {"env": {"ENGINE_ONLY_SETTING": f"engine-env-{MARK}"}},
        "proxy": {
            "tiers": [
                {"name": "local", "kind": "local"},
                {
                    "name": "backup",
                    "base_url": f"http://127.0.0.1:{free_port()}",
                    "api_key_env": "VLLM_TEST_TIER_KEY",
                },
                {
                    "name": "external",
                    "base_url": f"http://127.0.0.1:{free_port()}",
                    "api_key_env": "EXTERNAL_TEST_API_KEY",
                },
            ],
            # tiers that spend keys of their own need client keys, or this
            "auth": {"allow_anonymous": True},
        },
    }
    added = {**SECRETS, **INHERITED}
    saved = {k: os.environ.get(k) for k in added}
    os.environ.update(added)  # Sentinel's subprocess inherits the test's environment
    try:
        s = sentinel_factory(overrides, name="engine-env")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return s


def environ_of(pid: int) -> bytes:
    return Path(f"/proc/{pid}/environ").read_bytes()


def engine_environments(s: SentinelProcess) -> dict[str, list[bytes]] | None:
    """The environment of every engine process by role, once all three roles run."""
    s.assert_running()
    out: dict[str, list[bytes]] = {}
    try:
        for role, procs in s.engine_processes_by_role().items():
            out[role] = [environ_of(p.pid) for p in procs]
    except OSError:  # a process went away while it was read: look again
        return None
    if any(not env for envs in out.values() for env in envs):
        return None  # one is still being exec'd: its environment is not there yet
    return out if {"api_server", "engine_core", "worker"} <= set(out) else None


def test_secrets_in_sentinels_environment_never_reach_an_engine_process(
    sentinel: SentinelProcess,
) -> None:
    # (Popen returns once the exec has closed its error pipe, which is before the new
    # program's environment is set up: read right away, /proc/<pid>/environ can be empty)
    sentinel_env = wait_for(
        lambda: environ_of(sentinel.sentinel_pid()), 10, interval=0.05, what="environ"
    )
    assert SECRETS["VLLM_TEST_TIER_KEY"].encode() in sentinel_env  # the test set them up
    # the Worker exists once the model has loaded: no completion is needed
    roles = wait_for(
        lambda: engine_environments(sentinel),
        ENGINE_START_TIMEOUT,
        interval=0.5,
        what="the API server, EngineCore and Worker",
    )
    for role, envs in roles.items():
        for env in envs:
            for name, value in SECRETS.items():
                assert value.encode() not in env, f"{name} reached {role}"
                assert f"{name}=".encode() not in env, f"{name} reached {role}"
            assert f"ENGINE_ONLY_SETTING=engine-env-{MARK}".encode() in env, role
            assert f"OMP_TEST_SETTING=omp-{MARK}".encode() in env, role
            assert f"ENGINE_TEST_TAG={sentinel.tag}".encode() in env, role
