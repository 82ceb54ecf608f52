"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.unit.fake_engine import FakeEngine


@pytest.fixture(scope="module")
def engine() -> Iterator[FakeEngine]:
    """One fake vLLM for the module (each module resets its mode as it needs)."""
    with FakeEngine(model="tiny") as eng:
        yield eng
