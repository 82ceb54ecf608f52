"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fake_openai import FakeOpenAI
from tests.unit.fake_engine import FakeEngine


@pytest.fixture(scope="module")
def engine() -> Iterator[FakeEngine]:
    """One fake vLLM for the module (each module resets its mode as it needs)."""
    with FakeEngine(model="tiny") as eng:
        yield eng


@pytest.fixture
def a() -> Iterator[FakeOpenAI]:
    """A fake OpenAI-compatible upstream named "a" (a tier of the proxy tests)."""
    with FakeOpenAI("a") as f:
        yield f


@pytest.fixture
def b() -> Iterator[FakeOpenAI]:
    """A second one, "b" (the tier "a" falls back to)."""
    with FakeOpenAI("b") as f:
        yield f
