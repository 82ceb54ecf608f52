"""Shared by every test: no fake engine outlives its test, and none the session.

Fake engines (tests/unit/test_engine_fake.py) register their pids in a ``FAKE_PIDDIR``
(``tests.helpers.fake_piddir``). After each test, every fake registered during it that
still lives is killed (orphans with ppid 1 included), whether the test passed or not;
modules that assert on leftovers (test_engine_supervisor) check first, their fixtures
being torn down before this one. At the session's end any fake still alive, registered
or not (an API server of this checkout's fake without a FAKE_PIDDIR), is reported,
killed, and fails the session.
"""

from __future__ import annotations

from collections.abc import Iterator

import psutil
import pytest

from tests.helpers import (
    fake_piddir_count,
    fake_piddirs_since,
    kill_fakes,
    unregistered_fakes,
)


@pytest.fixture(autouse=True)
def _fake_engines_die_with_their_test() -> Iterator[None]:
    n = fake_piddir_count()
    yield
    kill_fakes(fake_piddirs_since(n))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    left = kill_fakes(fake_piddirs_since(0))
    for pid, _ in unregistered_fakes():
        try:
            p = psutil.Process(pid)
            family = [p, *p.children(recursive=True)]  # its EngineCore and Worker
            left.append((pid, " ".join(p.cmdline())[:160]))
            for q in family:
                q.kill()
        except psutil.Error:
            continue
    if not left:
        return
    text = f"fake engine processes outlived the tests (killed now): {left}"
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(text, red=True, bold=True)
    else:
        print(text)
    if session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
