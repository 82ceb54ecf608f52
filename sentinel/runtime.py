"""Tuning of Sentinel's own interpreter, applied once everything is built.

CPython's cyclic garbage collector stops the whole process while it walks the
objects of the generations it collects. With the default thresholds, objects of
in-flight requests survive young collections, fill the old generation, and a full
collection (every object of the process: ~60,000 after start-up) runs every few
seconds under load: a pause of tens of milliseconds on a proxied request. Freezing
what start-up created and collecting the young generation less often removes those
pauses; ``bench.proxy`` measures the effect on the proxy's tail latency.

The open-file limit: each client connection is a file descriptor, and a process that
runs out of them stops accepting (asyncio pauses its listening sockets), so a flood of
idle connections on one port would make the ops port's probes wait in the backlog. The
caps on open connections (``proxy.limits``, ``ops.limits``) only help below the limit:
``raise_open_files_limit`` lifts the soft limit towards the hard one to fit them.
"""

from __future__ import annotations

import gc
import resource

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


# descriptors beside client connections: upstream connections, the engine's pipes and
# logs, the payload log, NVML, the agent's socket
FD_MARGIN = 512


def raise_open_files_limit(connections: int) -> tuple[int, int]:
    """Lift the soft ``RLIMIT_NOFILE`` (no higher than the hard one) to fit
    ``connections`` client connections plus ``FD_MARGIN``; warn when the hard limit
    cannot. Returns (soft limit now, what was wanted)."""
    want = connections + FD_MARGIN
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit", soft=soft, wanted=new, error=str(exc))
    if soft != resource.RLIM_INFINITY and soft < want:
        log.warning(
            "the open-file limit is below what the connection caps allow: once it is "
            "reached, new connections (probes too) wait until one closes; raise the "
            "limit (ulimit -n, the container runtime's nofile) or lower "
            "proxy.limits.max_connections / ops.limits.max_connections",
            limit=soft,
            wanted=want,
        )
    return int(soft), want
