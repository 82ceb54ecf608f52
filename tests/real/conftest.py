"""Shared fixtures for the tests against the real vLLM engine (CPU, tiny model).

- Tests marked ``real`` are skipped when vLLM or the tiny model is missing.
- ``sentinel_factory`` (module scope) starts ``SentinelProcess`` instances with
  config overrides and stops them (SIGTERM) after the module, failing if any engine
  process of theirs is left anywhere on the machine.
- ``serving_sentinel`` (module scope) is one Sentinel with the default test config,
  already serving completions: share it between the tests of a module. Tests that
  kill engine parts must wait for it to serve again (``.wait_serving()``) before
  returning.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.real.harness import SentinelProcess, engine_available

# the shared Sentinels are restarted on purpose many times per module
SHARED_OVERRIDES: dict[str, Any] = {"supervisor": {"crash_loop_max_starts": 50}}

SentinelFactory = Callable[..., SentinelProcess]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if engine_available():
        return
    if os.environ.get("SENTINEL_REQUIRE_ENGINE") == "1":  # `make test`: never skip silently
        raise pytest.UsageError("real vLLM or var/tiny-model missing (run `make setup`)")
    skip = pytest.mark.skip(reason="real vLLM or var/tiny-model missing (run `make setup`)")
    for item in items:
        if "real" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def sentinel_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelFactory]:
    started: list[SentinelProcess] = []

    def start(
        overrides: dict[str, Any] | None = None,
        *,
        name: str = "sentinel",
        extra_args: list[str] | None = None,
        wrapper: list[str] | None = None,
    ) -> SentinelProcess:
        proc = SentinelProcess(tmp_path_factory.mktemp(name), overrides, extra_args, wrapper)
        started.append(proc.start())
        return proc

    yield start
    leaks = []
    for proc in started:
        proc.stop()
        leaks += [(p.pid, p.name()) for p in proc.engine_processes_anywhere()]
        for p in proc.engine_processes_anywhere():
            p.kill()
    assert not leaks, f"engine processes outlived their Sentinel: {leaks}"


@pytest.fixture(scope="module")
def serving_sentinel(sentinel_factory: SentinelFactory) -> SentinelProcess:
    s = sentinel_factory(SHARED_OVERRIDES, name="serving")
    s.wait_serving()
    return s
