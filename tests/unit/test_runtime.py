"""runtime.gc_*: start-up objects frozen, young collections rarer, as configured."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from sentinel.config.schema import RuntimeConfig
from sentinel.runtime import tune_gc


@pytest.fixture
def restore_gc() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


@pytest.mark.usefixtures("restore_gc")
def test_default_freezes_and_raises_the_young_threshold() -> None:
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    tune_gc(RuntimeConfig())
    assert gc.get_threshold()[0] == 50_000
    # every module, class and function loaded so far is out of the collector's reach
    assert gc.get_freeze_count() > 10_000


@pytest.mark.usefixtures("restore_gc")
def test_off_leaves_objects_collectable() -> None:
    gc.unfreeze()
    tune_gc(RuntimeConfig(gc_freeze=False, gc_young_threshold=700))
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold()[0] == 700
