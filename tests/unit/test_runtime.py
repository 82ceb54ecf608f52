"""Process-wide tuning (``sentinel.runtime``): the open-file limit fits the caps on open
connections, as far as the hard limit allows, and says so when it cannot."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2])))
from sentinel.logs import configure_logging
from sentinel.config.schema import LoggingConfig
configure_logging(LoggingConfig(level="info", format="json"), stream=sys.stdout)
from sentinel.runtime import raise_open_files_limit
got = raise_open_files_limit(int(sys.argv[3]))
print(json.dumps({"result": list(got), "now": resource.getrlimit(resource.RLIMIT_NOFILE)}))
"""


def _run(soft: int, hard: int, connections: int) -> tuple[dict, str]:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(soft), str(hard), str(connections)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1]), out


HARD = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
needs = pytest.mark.skipif(
    HARD != resource.RLIM_INFINITY and HARD < 4096, reason="hard open-file limit below 4096"
)


@needs
def test_a_low_soft_limit_is_lifted_to_fit_the_caps() -> None:
    got, out = _run(256, 4096, 2304)
    assert got["result"] == [2816, 2816] and got["now"] == [2816, 4096]
    assert "open-file limit is below" not in out


@needs
def test_a_hard_limit_below_the_caps_is_used_and_named_in_a_warning() -> None:
    got, out = _run(256, 1200, 2304)
    assert got["result"] == [1200, 2816] and got["now"] == [1200, 1200]
    warning = next(json.loads(line) for line in out.splitlines() if "open-file" in line)
    assert warning["limit"] == 1200 and warning["wanted"] == 2816
    assert "ops.limits.max_connections" in warning["event"]


@needs
def test_a_soft_limit_already_high_enough_is_left_alone() -> None:
    got, _ = _run(4000, 4096, 100)
    assert got["result"] == [4000, 612] and got["now"] == [4000, 4096]
