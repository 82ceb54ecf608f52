"""The watchdog agent failing on purpose inside every engine process: the engine keeps
serving, and each process reports the failure once.

In a module of its own: started while another engine of the same machine was starting
(the watchdog module's engine, replaced by its SIGSTOP test), this engine's Worker went
silent at start-up for minutes, twice on the 2-core CI machine; alone it serves in ~30 s.
Each module's Sentinels are stopped when the module ends.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import wait_for
from tests.real.conftest import SentinelFactory
from tests.real.harness import ENGINE_ARGS

pytestmark = pytest.mark.real


def test_failing_agent_never_stops_the_engine(sentinel_factory: SentinelFactory) -> None:
    s = sentinel_factory(
        {
            "engine": {
                "env": {
                    "SENTINEL_AGENT_TEST_CONTROL": "/nonexistent",
                    "SENTINEL_AGENT_TEST_FAIL": "callback",
                },
                "args": list(ENGINE_ARGS),
            }
        },
        name="failing-agent",
    )
    s.wait_serving()
    assert s.serves()

    def disabled() -> list[dict[str, Any]]:
        return [p for p in s.status()["watchdogs"]["gc"]["processes"] if p["disabled"]]

    dis = wait_for(disabled, 30, interval=0.5, what="the agents' disabled reports")
    assert "on purpose" in dis[0]["disabled"]
    warned = [
        r for r in s.log_records() if r.get("event", "").startswith("watchdog agent disabled")
    ]
    assert len({r["pid"] for r in warned}) == len(warned)  # once per process
    assert s.serves()
