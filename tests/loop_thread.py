"""The one way tests run an asyncio server (or any asyncio stack) beside the test: an event
loop on a daemon thread. Used by the fake upstream (tests/fake_openai.py), the fake engine,
the ops stack and the proxy under test (tests/unit/)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    """``start(setup)`` runs the coroutine ``setup()`` on a new loop in a daemon thread and
    returns its result once it is done (or raises what it raised, in the test's thread);
    the loop then runs until ``stop(cleanup)``, which stops it, runs ``cleanup()`` on it,
    closes it and joins the thread."""

    def __init__(
        self,
        name: str,
        loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop,
    ) -> None:
        self.name = name
        self._loop_factory = loop_factory
        self.loop = loop_factory()
        self._thread: threading.Thread | None = None
        self._cleanup: Callable[[], Awaitable[Any]] | None = None

    def start(self, setup: Callable[[], Awaitable[T]], timeout: float = 15.0) -> T:
        ready: concurrent.futures.Future[T] = concurrent.futures.Future()
        if self.loop.is_closed():  # started again after a stop
            self.loop = self._loop_factory()

        def main() -> None:
            loop = self.loop
            asyncio.set_event_loop(loop)
            try:
                ready.set_result(loop.run_until_complete(setup()))
            except BaseException as exc:  # noqa: BLE001 (raised in the test's thread)
                ready.set_exception(exc)
                loop.close()
                return
            loop.run_forever()
            try:
                if self._cleanup is not None:
                    loop.run_until_complete(self._cleanup())
            finally:
                loop.close()

        self._thread = threading.Thread(target=main, name=self.name, daemon=True)
        self._thread.start()
        try:
            return ready.result(timeout)
        except concurrent.futures.TimeoutError:
            raise RuntimeError(f"{self.name} did not start within {timeout} s") from None

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 5.0) -> T:
        """Run ``coro`` on the loop; its result, or what it raised."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = 5.0) -> T:
        """``fn(*args)`` on the loop (state changes the way the code under test makes them)."""

        async def call() -> T:
            return fn(*args)

        return self.run(call(), timeout)

    def stop(
        self, cleanup: Callable[[], Awaitable[Any]] | None = None, timeout: float = 10.0
    ) -> None:
        if self._thread is None:
            return
        self._cleanup = cleanup
        try:
            self.loop.call_soon_threadsafe(self.loop.stop)
        except RuntimeError:  # closed: setup failed
            pass
        self._thread.join(timeout)
        self._thread = None
