"""Serving the proxy: uvicorn (httptools + uvloop where available) on a socket we bind,
so port 0 works and the bound port is known; uvicorn's own signal capture is
disabled because Sentinel's loop owns the signals.

uvicorn writes a response's head and its body with one ``transport.write`` each: two
send() system calls for every non-streamed answer. The connections' transports hold
a response head back until the first body part is written (or the event-loop step
ends), and send both in one system call; later body parts (a stream's chunks) go
straight through. ``chunk_writer`` lets the app write a stream's later parts into the
connection itself, in uvicorn's chunked framing.

The protocol hands every whole request to the app's ``early_start`` (when it has one)
from the read that completed it, with an ``InlineResponse`` that writes a response
(a whole one, or a chunked one's head and first part and, later, its end) into
uvicorn's request cycle from there, outside the ASGI task. While the request's
task has not been created yet, the app may hold it back (``early_start`` returns
True): it then either starts it (``InlineResponse.start_task``: the task runs and
sees what was written) or, having answered and recorded the request itself, never
needs it (``InlineResponse.no_task``). This module is the one that knows uvicorn's
insides.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Generator
from typing import Any

import uvicorn

try:  # the checks and status lines of uvicorn's httptools protocol (InlineResponse's)
    from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE, STATUS_LINE
except ImportError:  # no httptools: uvicorn's h11 protocol, and no fast path
    pass

from sentinel.logs import get_logger
from sentinel.net import local_url

log = get_logger(__name__)

# unsent bytes to a client above which ``chunk_writer`` refuses a part, so that it goes
# through ASGI's send, which waits for the client (asyncio's default write high-water)
WRITE_BUFFER_MAX = 64 * 1024


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class _CorkedTransport:
    """A transport that sends a response head together with the first body part."""

    __slots__ = ("_transport", "_loop", "_buf", "_scheduled")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._buf: list[bytes] = []
        self._scheduled = False

    def write(self, data: bytes) -> None:
        if not data:
            return
        buf = self._buf
        if buf:  # a head is waiting: it leaves with this body part, now
            buf.append(data)
            self.flush()
        elif data.startswith(b"HTTP/"):  # a response head: wait for the body's first part
            buf.append(data)
            if not self._scheduled:
                self._scheduled = True
                self._loop.call_soon(self._step_end)
        elif not self._transport.is_closing():
            self._transport.write(data)  # body parts of a stream: straight through

    def _step_end(self) -> None:
        self._scheduled = False
        self.flush()

    def write_now(self, data: bytes) -> None:
        """Write ``data`` at once (after anything held back): a whole head and body."""
        if self._buf:
            self._buf.append(data)
            self.flush()
        elif not self._transport.is_closing():
            self._transport.write(data)

    def flush(self) -> None:
        buf = self._buf
        if buf:
            data = buf[0] if len(buf) == 1 else b"".join(buf)
            buf.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._buf.clear()
        self._transport.abort()

    @property
    def raw(self) -> asyncio.Transport:
        """The socket's own transport (for writers that hold nothing back)."""
        return self._transport

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def chunk_writer(send: Any, on_part: Callable[[bytes], None]) -> Callable[[bytes], bool] | None:
    """For a response that uvicorn's httptools cycle sends with chunked encoding (its
    head and first part already sent): a writer of further body parts straight into
    the client's socket, the same bytes ``send`` would write, without an ASGI message,
    a task step or the head-holding wrapper (whose buffer is empty once a body part has
    gone); ``on_part`` sees each part written. It returns False, writing nothing, when
    the client is gone or has more than WRITE_BUFFER_MAX bytes unsent: that part, and
    the rest, then go through ``send``, which waits for the client. None: another
    server or framing (send only). One writer per stream, on the path of every event:
    kept to one Python frame besides ``on_part``."""
    cycle = getattr(send, "__self__", None)  # uvicorn's RequestResponseCycle
    transport = getattr(cycle, "transport", None)
    if transport is None or getattr(cycle, "chunked_encoding", None) is not True:
        return None
    if isinstance(transport, _CorkedTransport):
        transport.flush()
        transport = transport.raw

    def write(chunk: bytes) -> bool:
        if not chunk:
            return True  # an empty chunk would end the chunked body
        if (
            cycle.disconnected
            or transport.is_closing()
            or transport.get_write_buffer_size() > WRITE_BUFFER_MAX
        ):
            return False
        transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        on_part(chunk)
        return True

    return write


class InlineResponse:
    """Writes a response into uvicorn's httptools request cycle from outside its ASGI
    task (an event-loop callback): the bytes uvicorn's ``send`` would write, and the
    same keep-alive and completion handling. Only while ``ready()``: no response
    started, the client there and not pushing back, so that nothing has to wait.

    ``held``: the request's task has not been created and waits for the app, which
    must then call ``start_task`` (the task runs as usual) or ``no_task`` (the app
    answered and recorded the request itself; the task is never created)."""

    __slots__ = ("_cycle", "_proto")

    def __init__(self, cycle: Any, proto: Any = None) -> None:
        self._cycle = cycle
        self._proto = proto  # the protocol holding this cycle's task back, if any

    @property
    def held(self) -> bool:
        proto = self._proto
        return proto is not None and proto.holds(self._cycle)

    def start_task(self) -> None:
        """Create the request's task now, if it is still held back (idempotent)."""
        proto = self._proto
        if proto is not None:
            self._proto = None
            proto.release(self._cycle, start=True)

    def no_task(self) -> None:
        """The request is answered and recorded: its task is never created."""
        proto = self._proto
        if proto is not None:
            self._proto = None
            proto.release(self._cycle, start=False)

    def ready(self) -> bool:
        c = self._cycle
        return not (
            c.response_started or c.disconnected or c.flow.write_paused or c.transport.is_closing()
        )

    @property
    def send_fn(self) -> Callable[[dict[str, Any]], Any]:
        """The cycle's ASGI ``send`` (what ``chunk_writer`` takes)."""
        return self._cycle.send  # type: ignore[no-any-return]

    def respond(
        self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, more_body: bool
    ) -> None:
        """The response's head and its first body part (all of it unless ``more_body``)
        in one write, framed as uvicorn's ``send`` frames them: with a content-length
        header the body is sent as is, without one it is chunked. Further parts go
        through ``send`` (or ``chunk_writer``). Headers must be lower-case and carry
        neither ``connection`` nor ``transfer-encoding``."""
        c = self._cycle
        if c.scope["method"] == "HEAD":
            raise RuntimeError("InlineResponse does not answer HEAD requests")
        out = [STATUS_LINE[status]]
        length: int | None = None
        for name, value in (*c.default_headers, *headers):
            if HEADER_RE.search(name) or HEADER_VALUE_RE.search(value):
                raise RuntimeError(f"invalid response header {name!r}")
            if name == b"content-length":
                length = int(value)
            elif name in (b"connection", b"transfer-encoding"):
                raise RuntimeError(f"InlineResponse sets {name.decode()} itself")
            out += (name, b": ", value, b"\r\n")
        c.response_started = True  # the head is valid: from here on it goes out
        c.waiting_for_100_continue = False
        if not c.keep_alive:
            out.append(b"connection: close\r\n")
        if length is None and status not in (204, 304):
            c.chunked_encoding = True
            c.expected_content_length = 0
            out.append(b"transfer-encoding: chunked\r\n\r\n")
            if body:
                out += (b"%x\r\n" % len(body), body, b"\r\n")
            if not more_body:
                out.append(b"0\r\n\r\n")
        else:
            left = (length or 0) - len(body)
            if left < 0 or (left and not more_body):
                raise RuntimeError("response body does not match its content-length")
            c.chunked_encoding = False
            c.expected_content_length = left
            out += (b"\r\n", body)
        c.transport.write_now(b"".join(out))
        if not more_body:
            self._complete()

    def end_body(self) -> bool:
        """End a chunked body begun by ``respond(..., more_body=True)`` (its later parts
        written by ``chunk_writer``): the last chunk, and uvicorn's completion, as
        ``send`` does. False, writing nothing: the client is gone or closing, or the
        response is not such a body."""
        c = self._cycle
        if (
            c.response_complete
            or c.chunked_encoding is not True
            or c.disconnected
            or c.transport.is_closing()
        ):
            return False
        c.transport.write(b"0\r\n\r\n")
        self._complete()
        return True

    def _complete(self) -> None:
        """The response is all written: uvicorn's completion (keep-alive or close, the
        next pipelined request), as its ``send`` does after the last part."""
        c = self._cycle
        c.response_complete = True
        c.message_event.set()
        if not c.keep_alive:
            c.transport.close()
        c.on_response()


EarlyStart = Callable[[dict[str, Any], bytes, InlineResponse], bool]


def _protocol_class(early_start: EarlyStart | None) -> type[asyncio.Protocol] | str:
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # no httptools: uvicorn's h11 protocol, uncorked, no fast path
        return "h11"

    from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT

    class CorkedHttpToolsProtocol(HttpToolsProtocol):
        """uvicorn's protocol, corked; with ``early_start``, a request's ASGI task starts
        once its body is whole (so that ``early_start`` always comes first), unless
        the body outgrows uvicorn's read buffer or the client waits for 100-continue."""

        _deferred: tuple[Any, Any] | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(_CorkedTransport(transport, self.loop))  # type: ignore[arg-type]

        def _start_asgi_task(self, cycle: Any, app: Any) -> None:
            if early_start is not None and cycle.more_body and not cycle.waiting_for_100_continue:
                self._deferred = (cycle, app)  # started by on_message_complete
                return
            super()._start_asgi_task(cycle, app)

        def _start_deferred(self) -> None:
            deferred = self._deferred
            if deferred is not None:
                self._deferred = None
                super()._start_asgi_task(*deferred)

        def on_body(self, body: bytes) -> None:
            super().on_body(body)
            if self._deferred is not None and len(self.cycle.body) > HIGH_WATER_LIMIT:
                self._start_deferred()  # reading pauses until the app reads: start it

        def holds(self, cycle: Any) -> bool:
            deferred = self._deferred
            return deferred is not None and deferred[0] is cycle

        def release(self, cycle: Any, start: bool) -> None:
            """For ``InlineResponse``: start the held task of ``cycle``, or drop it."""
            if self.holds(cycle):
                if start:
                    self._start_deferred()
                else:
                    self._deferred = None

        def on_message_complete(self) -> None:
            super().on_message_complete()
            cycle = self.cycle
            if (
                early_start is not None
                and not cycle.more_body  # this request's body is whole
                and not self.pipeline  # not queued behind an earlier response
                and not cycle.response_started
            ):
                out = InlineResponse(cycle, self if self.holds(cycle) else None)
                if early_start(cycle.scope, bytes(cycle.body), out):
                    return  # the app starts the task, or answers without one
            self._start_deferred()

        def connection_lost(self, exc: Exception | None) -> None:
            super().connection_lost(exc)
            self._start_deferred()  # the app hears of the request, and of the disconnect

    return CorkedHttpToolsProtocol


class ProxyBindError(RuntimeError):
    pass


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say so (else
    # Nagle + delayed ACK add ~40 ms to every response written in two parts)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ProxyBindError(
            f"proxy cannot listen on {host}:{port} (proxy.host/proxy.port): {exc.strerror}"
        ) from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class ProxyServer:
    def __init__(self, app: Any, host: str, port: int, backlog: int = 2048) -> None:
        self.app = app
        self.host = host
        self.sock = bind(host, port)
        self.port: int = self.sock.getsockname()[1]
        self.config = uvicorn.Config(
            app,
            http=_protocol_class(getattr(app, "early_start", None)),
            loop="none",
            lifespan="off",
            access_log=False,
            server_header=False,
            date_header=False,
            log_config=None,
            timeout_keep_alive=75,
            backlog=backlog,
            ws="none",
            proxy_headers=False,
        )
        self.server = _Server(self.config)

    @property
    def url(self) -> str:
        return local_url(self.host, self.port)

    async def serve(self) -> None:
        log.info("proxy_listening", host=self.host, port=self.port)
        try:
            await self.server.serve(sockets=[self.sock])
        finally:
            self.sock.close()

    def request_stop(self) -> None:
        self.server.should_exit = True

    async def wait_started(self, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not self.server.started:
                await asyncio.sleep(0.01)
