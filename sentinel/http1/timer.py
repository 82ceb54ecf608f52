"""A client connection's one timer (``ConnectionTimer``, mixed into ``HttpConnection``):
its phase (idle, head, body, linger) says what it guards, and moving to a later deadline
costs no timer call; beside the phase, the send deadline: a client that takes none of
the bytes held for it within ``send_timeout_s`` (it stopped reading) is aborted."""

from __future__ import annotations

from sentinel.http1 import refusals


class ConnectionTimer:
    """Mixed into ``HttpConnection``; uses its loop, transport, limits, phase and
    deadline fields, server events and ``_refuse`` / ``close``."""

    def _await_send(self) -> None:
        """Bytes wait for the client: unless it takes some within ``send_timeout_s``,
        the connection is aborted (a client that stops reading holds nothing for good)."""
        t = self.transport
        if self._send_deadline or t is None:
            return
        self._send_mark = t.get_write_buffer_size()
        self._send_deadline = self.loop.time() + self.limits.send_timeout_s
        self._schedule(self._send_deadline)

    def _arm(self, phase: str, timeout: float) -> None:
        if self._read_paused and phase in ("head", "body"):
            self._phase = None  # (reading paused by us: armed again on resume)
            return
        self._phase = phase
        deadline = self.loop.time() + timeout
        self._deadline = deadline
        self._schedule(deadline)

    def _schedule(self, deadline: float) -> None:
        timer = self._timer
        if timer is None or deadline < self._timer_at:
            if timer is not None:
                timer.cancel()
            self._timer_at = deadline
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        t = self.transport
        if t is None:
            return
        now = self.loop.time()
        send = self._send_deadline
        if send and now >= send:
            held = t.get_write_buffer_size()
            if held and held >= self._send_mark:
                # nothing taken for send_timeout_s: the unsent bytes are dropped
                self._send_deadline = 0.0
                self.server.events.client_refused("send_timeout")
                self.closing = True
                t.abort()
                return
            # the client took some (or all): a new deadline while bytes still wait
            self._send_deadline = 0.0
            if held and (self.write_paused or t.is_closing()):
                self._await_send()
        self._on_phase(now)
        if self._send_deadline:
            self._schedule(self._send_deadline)

    def _on_phase(self, now: float) -> None:
        phase = self._phase
        if phase is None or (self.closing and phase != "linger"):
            return
        if now < self._deadline:
            self._schedule(self._deadline)
            return
        self._phase = None
        if phase == "linger":
            if self.transport is not None:
                self.transport.abort()
        elif phase == "idle":
            self.server.events.client_refused("idle_timeout")
            self.close()
        elif phase == "head":
            self._refuse(refusals.header_timeout(self.limits))
        else:
            self._refuse(refusals.body_timeout(self.limits))
