"""Shared by every test: no fake engine outlives its test, and none the session.

Fake engines (tests/unit/test_engine_fake.py) register their pids in a ``FAKE_PIDDIR``
(``tests.helpers.fake_piddir``). After each test, every fake registered during it that
still lives is killed (orphans with ppid 1 included), whether the test passed or not;
modules that assert on leftovers (test_engine_supervisor) check first, their fixtures
being torn down before this one. At the session's end a registered fake still alive is
reported, killed, and fails the session; a fake API server of this checkout started
during the session that registered nowhere is reported (another pytest session in
this checkout may own it, so it is left alone).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.helpers import (
    fake_piddir_count,
    fake_piddirs_since,
    kill_fakes,
    unregistered_fakes,
)

_SESSION_START = time.time()


@pytest.fixture(autouse=True)
def _fake_engines_die_with_their_test() -> Iterator[None]:
    n = fake_piddir_count()
    yield
    kill_fakes(fake_piddirs_since(n))


def _say(session: pytest.Session, text: str) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(text, red=True, bold=True)
    else:
        print(text)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    left = kill_fakes(fake_piddirs_since(0))
    if left:
        _say(session, f"fake engine processes outlived their tests (killed now): {left}")
        if session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    stray = unregistered_fakes(_SESSION_START)
    if stray:
        _say(session, f"fake engines without a FAKE_PIDDIR are running (not killed): {stray}")
