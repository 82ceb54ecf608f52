"""/metrics rendering: Sentinel's registry, then the engine's series passed through.

Both halves are text format 0.0.4. The engine block is prepared when the engine
is scraped (``sentinel.probes.exposition``: one HELP/TYPE per family, only
``vllm:*`` families, names made promtool-clean), so a render only concatenates
and never waits on the engine. Families cannot collide: Sentinel's are all
``sentinel_*``.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MetricsRenderer:
    def __init__(
        self, registry: CollectorRegistry, passthrough: Callable[[], str] | None = None
    ) -> None:
        self.registry = registry
        self.passthrough = passthrough

    def render(self) -> bytes:
        own = generate_latest(self.registry)
        if self.passthrough is None:
            return own
        engine = self.passthrough()
        return own + engine.encode() if engine else own
