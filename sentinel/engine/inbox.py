"""The engine owner's command queue: signal handlers, the probes and the ops endpoints
only queue a command (from any thread); the owner's main loop acts on it."""

from __future__ import annotations

import asyncio
import threading
from typing import Any


class Inbox:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: int | None = None

    def bind(self) -> asyncio.AbstractEventLoop:
        """Called by the main loop once it runs: later puts from other threads go through it."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        return self._loop

    def put(self, item: tuple[Any, ...]) -> None:
        loop = self._loop
        if loop is not None and threading.get_ident() != self._thread:
            loop.call_soon_threadsafe(self.queue.put_nowait, item)
        else:
            self.queue.put_nowait(item)
