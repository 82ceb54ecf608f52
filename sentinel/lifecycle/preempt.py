"""Preemption notices: a file appearing, or a cloud metadata URL answering a notice.

On the first notice the drain controller drains and stops the engine (no relaunch),
before the node is taken. Sources (lifecycle.preemption):

- ``file``: a path another agent creates (a Kubernetes preStop hook, a node agent);
- ``url``: polled every ``poll_interval_s``; a notice is HTTP 200 with a body matching
  ``match`` (empty = any). AWS's ``spot/instance-action`` answers 404 until an
  interruption is scheduled; GCP's ``instance/preempted`` answers ``TRUE`` (with the
  ``Metadata-Flavor: Google`` header); Azure's ``scheduledevents`` lists a ``Preempt``
  event (with ``Metadata: true``). Errors and other statuses are no notice (logged once).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

import httpx

from sentinel.config.schema import PreemptionConfig
from sentinel.logs import get_logger

log = get_logger("sentinel.lifecycle")


class PreemptionWatcher:
    def __init__(self, cfg: PreemptionConfig, on_notice: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.on_notice = on_notice
        self._match = re.compile(cfg.match) if cfg.match else None
        self._error_logged = False
        self.noticed: str | None = None

    @property
    def enabled(self) -> bool:
        return self.cfg.file is not None or self.cfg.url is not None

    async def run(self) -> None:
        if not self.enabled:
            return
        log.info("watching for preemption notices", file=self.cfg.file, url=self.cfg.url)
        async with httpx.AsyncClient(timeout=self.cfg.timeout_s, trust_env=False) as client:
            while self.noticed is None:
                detail = await self.check(client)
                if detail is not None:
                    self.noticed = detail
                    log.warning(
                        "preemption notice: draining and stopping the engine", detail=detail
                    )
                    self.on_notice(detail)
                    return
                await asyncio.sleep(self.cfg.poll_interval_s)

    async def check(self, client: httpx.AsyncClient) -> str | None:
        if self.cfg.file is not None and self.cfg.file.exists():
            return f"notice file {self.cfg.file} exists"
        if self.cfg.url is None:
            return None
        try:
            resp = await client.get(self.cfg.url, headers=self.cfg.headers)
        except httpx.HTTPError as exc:
            self._log_once(f"{type(exc).__name__}: {exc}")
            return None
        if resp.status_code != 200:
            if resp.status_code != 404:
                self._log_once(f"HTTP {resp.status_code}")
            return None
        text = resp.text[:4096]
        if self._match is not None and not self._match.search(text):
            return None
        return f"{self.cfg.url} answered: {text[:200].strip()}"

    def _log_once(self, error: str) -> None:
        if not self._error_logged:
            self._error_logged = True
            log.warning(
                "preemption URL cannot be read (no notice assumed)", url=self.cfg.url, error=error
            )
