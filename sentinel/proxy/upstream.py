"""The upstream HTTP client behind a small transport seam.

``Transport.send`` returns once the upstream's status line and headers are in; the
body is then read whole (``read``) or chunk by chunk as it arrives (``chunks``, one
item per network read, never merged). ``abort`` closes the connection at once, which
is how a cancelled request reaches the upstream (vLLM aborts a request whose
connection closes). Failures surface as ``UpstreamError`` with a short reason that
the chain uses for fallback decisions and metrics.

``AiohttpTransport`` is the production client (pooled keep-alive connections, C
parser); tests pass any object with the same two methods.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import aiohttp


class UpstreamError(Exception):
    """A transport-level failure: connect_error, connect_timeout or reset."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(slots=True)
class UpstreamRequest:
    method: str
    base_url: str  # scheme://host[:port][/prefix], no trailing slash
    target: str  # path and query, as the client sent them
    headers: dict[str, str]
    body: bytes
    connect_timeout_s: float


class UpstreamResponse(Protocol):
    status: int
    headers: list[tuple[bytes, bytes]]  # lower-case names, as received
    content_length: int | None
    content_type: str

    async def read(self) -> bytes: ...

    def chunks(self) -> AsyncIterator[bytes]: ...

    def release(self) -> None: ...

    def abort(self) -> None: ...


class Transport(Protocol):
    async def send(self, request: UpstreamRequest) -> UpstreamResponse: ...

    async def aclose(self) -> None: ...


def _map_error(exc: BaseException) -> UpstreamError:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamError("connect_error", f"cannot connect: {exc.os_error or exc}")
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamError("connect_timeout", "connect timed out")
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError)):
        return UpstreamError("reset", f"upstream closed the connection: {exc}")
    return UpstreamError("reset", f"upstream connection failed: {exc}")


_CLIENT_ERRORS = (aiohttp.ClientError, OSError)


class AiohttpResponse:
    __slots__ = ("_resp", "status", "headers", "content_length", "content_type")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.headers = [(k.lower(), v) for k, v in resp.raw_headers]
        self.content_length = resp.content_length
        self.content_type = resp.headers.get("content-type", "")

    async def read(self) -> bytes:
        try:
            return await self._resp.read()
        except _CLIENT_ERRORS as exc:
            self._resp.close()
            raise _map_error(exc) from exc

    async def chunks(self) -> AsyncIterator[bytes]:
        content = self._resp.content
        try:
            while True:
                data, _ = await content.readchunk()
                if not data:
                    if content.at_eof():
                        return
                    continue
                yield data
        except _CLIENT_ERRORS as exc:
            self._resp.close()
            raise _map_error(exc) from exc

    def release(self) -> None:
        self._resp.release()

    def abort(self) -> None:
        self._resp.close()


class AiohttpTransport:
    """Pooled keep-alive client for one upstream (one per tier)."""

    def __init__(self, limit: int = 0, keepalive_s: float = 30.0) -> None:
        self._limit = limit
        self._keepalive_s = keepalive_s
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._limit,
                limit_per_host=0,
                keepalive_timeout=self._keepalive_s,
                ttl_dns_cache=300,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
                timeout=aiohttp.ClientTimeout(total=None),
            )
        return self._session

    async def send(self, request: UpstreamRequest) -> AiohttpResponse:
        session = self._get_session()
        try:
            resp = await session.request(
                request.method,
                request.base_url + request.target,
                headers=request.headers,
                data=request.body or None,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=request.connect_timeout_s),
            )
        except _CLIENT_ERRORS as exc:
            raise _map_error(exc) from exc
        except TimeoutError as exc:  # a connect timeout not wrapped by aiohttp
            raise UpstreamError("connect_timeout", "connect timed out") from exc
        return AiohttpResponse(resp)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def drain(resp: UpstreamResponse, limit: int) -> bytes:
    """Read at most ``limit`` bytes of an error body (for pass-through), then drop the rest."""
    out = bytearray()
    async for chunk in resp.chunks():
        out += chunk
        if len(out) >= limit:
            resp.abort()
            break
    return bytes(out[:limit])
