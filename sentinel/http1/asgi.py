"""An ASGI app served as an ``http1`` handler (``AsgiHandler``): how the ops port serves
its Starlette app on our own HTTP/1.1 server, under the same limits as the traffic port.

One request at a time per connection, whole (the connection reads the body before the
handler runs): ``receive`` gives the body once, then waits until the response is made
(or the client has gone, which cancels the app) and says ``http.disconnect``. ``send``
maps the response: a single body message (``more_body`` False) becomes one write with
its length (``Response.whole``); a body in parts becomes a chunked stream, written as
the client takes it (``paused`` / ``drain``). An app that raises, or returns without a
response, gets a 500 (logged with its traceback); one that raises mid-stream has its
connection closed, which tells the client the answer was cut. ASGI spec 2.4: no
extensions (pathsend, zerocopy) are offered; ``send`` after the client left raises
``OSError``. No lifespan: the app's state is built by its owner.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import unquote

import httptools

from sentinel.http1.response import Request, Response
from sentinel.logs import LogThrottle, get_logger, raised_at
from sentinel.proxy.errors import error_body

log = get_logger(__name__)

Message = MutableMapping[str, Any]
AsgiApp = Callable[
    [Message, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]

_ASGI = {"version": "3.0", "spec_version": "2.4"}
_FRAMING = (b"content-length", b"transfer-encoding", b"connection")
_JSON = [(b"content-type", b"application/json")]


def _address(info: object) -> tuple[str, int] | None:
    if isinstance(info, tuple) and len(info) >= 2:
        return (str(info[0]), int(info[1]))
    return None


def _split_target(target: bytes) -> tuple[bytes, bytes] | None:
    """(raw path, query string) of a request target; None when it has no path."""
    if target[:1] == b"/":
        raw_path, _, query = target.partition(b"?")
        return raw_path, query
    try:  # the absolute form (http://host/path?q): its path and query
        url = httptools.parse_url(target)
    except httptools.HttpParserInvalidURLError:
        return None
    if not url.path:
        return None
    return url.path, url.query or b""


class _Exchange:
    """One request's ``receive`` and ``send``."""

    __slots__ = ("req", "resp", "status", "headers", "streaming", "done", "_body_sent")

    def __init__(self, req: Request, resp: Response) -> None:
        self.req = req
        self.resp = resp
        self.status = 0  # from http.response.start, until the first body part
        self.headers: list[tuple[bytes, bytes]] = []
        self.streaming = False
        self.done: asyncio.Future[None] | None = None
        self._body_sent = False

    async def receive(self) -> Message:
        if not self._body_sent:
            self._body_sent = True
            return {"type": "http.request", "body": self.req.body, "more_body": False}
        if not self.resp.ended:  # the app awaits the disconnect: it comes after the answer
            self.done = asyncio.get_running_loop().create_future()
            await self.done
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        resp = self.resp
        if resp.gone:
            raise OSError("the client has gone")
        kind = message["type"]
        if kind == "http.response.start":
            if self.status or resp.started:
                raise RuntimeError("http.response.start sent twice")
            self.status = int(message["status"])
            head = self.req.method == "HEAD"
            headers = self.headers
            for k, v in message.get("headers", ()):
                k = bytes(k).lower()
                # the framing is ours (a HEAD answer keeps the length its GET would have)
                if k not in _FRAMING or (head and k == b"content-length"):
                    headers.append((k, bytes(v)))
            return
        if kind != "http.response.body":
            raise RuntimeError(f"unexpected ASGI message {kind!r}")
        if not self.status:
            raise RuntimeError("http.response.body before http.response.start")
        if resp.ended:
            return  # (a HEAD answer's body: not sent)
        body = bytes(message.get("body", b""))
        more = bool(message.get("more_body", False))
        if not resp.started:
            if self.req.method == "HEAD":  # the app's own content-length stays
                resp.head_only(self.status, self.headers)
            elif not more:
                resp.whole(self.status, self.headers, body)
            else:
                self.streaming = True
                resp.start(self.status, self.headers, body)
        elif self.streaming:
            resp.write(body)
            if not more:
                resp.end()
        if resp.ended:
            if self.done is not None and not self.done.done():
                self.done.set_result(None)
        elif resp.paused:
            await resp.drain()


class AsgiHandler:
    """``AsgiHandler(app)`` is an ``http1`` handler serving ``app``."""

    def __init__(self, app: AsgiApp, what: str = "ops") -> None:
        self.app = app
        self.what = what
        # an app's failure a client can repeat at will is logged at most once a minute
        self._throttle = LogThrottle()

    async def __call__(self, req: Request, resp: Response) -> None:
        split = _split_target(req.target)
        if split is None:
            msg = "the request target has no path"
            resp.whole(400, _JSON, error_body(400, msg, "bad_request"))
            return
        raw_path, query = split
        path = raw_path.decode("latin-1")
        if "%" in path:
            path = unquote(path)
        scope = {
            "type": "http",
            "asgi": _ASGI,
            "http_version": req.version,
            "method": req.method,
            "scheme": "http",
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "root_path": "",
            "headers": req.headers,
            "client": _address(resp.transport_info("peername")),
            "server": _address(resp.transport_info("sockname")),
        }
        ex = _Exchange(req, resp)
        try:
            await self.app(scope, ex.receive, ex.send)
        except Exception as exc:  # noqa: BLE001 - an app's error is a 500, never a crash
            if resp.gone:
                return
            extra = self._throttle.allow(raised_at(exc))
            if extra is not None:
                log.error(
                    f"{self.what}_app_failed",
                    method=req.method,
                    path=path,
                    error=f"{type(exc).__name__}: {exc}",
                    exc_info=exc,
                    **extra,
                )
            if not resp.started:
                msg = f"internal error in Sentinel's {self.what} server"
                resp.whole(500, _JSON, error_body(500, msg, "internal_error"))
            return  # (a stream cut short: the connection closes after it)
        if not resp.started:
            log.error(f"{self.what}_app_no_response", method=req.method, path=path)
            msg = f"Sentinel's {self.what} server made no response to this request"
            resp.whole(500, _JSON, error_body(500, msg, "internal_error"))
        elif not resp.ended:
            log.error(f"{self.what}_app_response_cut", method=req.method, path=path)
