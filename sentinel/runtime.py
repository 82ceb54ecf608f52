"""Tuning of Sentinel's own interpreter, applied once everything is built.

CPython's cyclic garbage collector stops the whole process while it walks the
objects of the generations it collects. With the default thresholds, objects of
in-flight requests survive young collections, fill the old generation, and a full
collection (every object of the process: ~60,000 after start-up) runs every few
seconds under load: a pause of tens of milliseconds on a proxied request. Freezing
what start-up created and collecting the young generation less often removes those
pauses; ``bench.proxy`` measures the effect on the proxy's tail latency.
"""

from __future__ import annotations

import gc

from sentinel.config.schema import RuntimeConfig
from sentinel.logs import get_logger

log = get_logger(__name__)


def tune_gc(cfg: RuntimeConfig) -> None:
    """Apply ``runtime.gc_*``: call after start-up, once the long-lived objects exist."""
    _, middle, old = gc.get_threshold()
    gc.set_threshold(cfg.gc_young_threshold, middle, old)
    if cfg.gc_freeze:
        gc.collect()
        gc.freeze()
    log.debug(
        "gc tuned",
        frozen_objects=gc.get_freeze_count(),
        thresholds=list(gc.get_threshold()),
    )
