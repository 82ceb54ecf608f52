"""Request validation and header policy: what a client request must be before any tier
sees it, and which of its headers may travel.

Order: the path is normalised and checked first (dot segments and encoded slashes
are refused, so that no upstream ever resolves a path differently from Sentinel),
then the endpoint allowlist, the method, the headers, and the body (UTF-8, JSON no
deeper than the limit, a model where the endpoint needs one). Every refusal is a
``ProxyError`` naming what was wrong; nothing here touches the network.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from typing import Any
from urllib.parse import unquote_to_bytes

import msgspec

from sentinel.config.schema import ProxyConfig
from sentinel.proxy.errors import ProxyError
from sentinel.proxy.tier import ProxyRequest

# paths whose JSON body must name a model
MODEL_PATHS = frozenset(
    {
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/moderations",
        "/v1/audio/speech",
        "/v1/rerank",
        "/v1/score",
    }
)
METHODS = frozenset({"GET", "POST", "DELETE"})
# client headers never forwarded (hop-by-hop, or set by Sentinel per upstream)
DROP_REQUEST_HEADERS = frozenset(
    {
        b"host",
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
        b"http2-settings",
        b"content-length",
        b"accept-encoding",
        b"x-request-id",
        b"proxy-authorization",
        b"expect",
        # client credentials other than Authorization: of no use to vLLM, never sent to
        # any tier (Authorization reaches the local tier only: ``Tier.headers_for``)
        b"x-api-key",
        b"api-key",
        b"cookie",
    }
)
# upstream response headers never relayed to the client: hop-by-hop and framing (ours),
# and what an upstream sets about its own account or session (the headers an upstream's
# ``Connection`` header names are hop-by-hop too: ``UpstreamConnection``)
DROP_RESPONSE_HEADERS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-authenticate",
        b"content-length",
        b"x-request-id",
        b"server",
        b"date",
        b"set-cookie",
        b"openai-organization",
    }
)
MAX_REQUEST_ID = 128
_BAD_PATH_BYTES = re.compile(rb"[\x00-\x1f\x7f\\]")
_PATH_CACHE_MAX = 1024

_decode_json = msgspec.json.Decoder().decode

_ID_PREFIX = os.urandom(6).hex()
_ID_COUNTER = itertools.count(1)


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):010x}"


def request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's x-request-id when it is sane, else a new one (process prefix + counter)."""
    for k, v in headers:
        if k == b"x-request-id":
            if 0 < len(v) <= MAX_REQUEST_ID and v.isascii() and v.decode().isprintable():
                return v.decode()
            break
    return new_request_id()


def _duplicate(name: str) -> ProxyError:
    return ProxyError(
        400, f"Request has more than one {name} header: send it once", "duplicate_header"
    )


def normalise_path(target: bytes) -> tuple[str, bytes]:
    """The request target's path, percent-decoded, and its query. Refuses (400) what an
    upstream could resolve differently: dot segments, encoded slashes or backslashes,
    empty segments, control characters, a fragment, a target not in origin form."""
    path, _, query = target.partition(b"?")
    if not path.startswith(b"/") or b"#" in target:
        raise _bad_path(target, "the request target must be a path starting with '/'")
    decoded = unquote_to_bytes(path) if b"%" in path else path
    if b"%" in path:
        low = path.lower()
        if b"%2f" in low or b"%5c" in low:
            raise _bad_path(target, "encoded slashes are not accepted in the path")
    if _BAD_PATH_BYTES.search(decoded):
        raise _bad_path(target, "backslashes and control characters are not accepted")
    segs = decoded.split(b"/")[1:]
    last = len(segs) - 1
    for i, seg in enumerate(segs):
        if seg in (b".", b".."):
            raise _bad_path(target, "dot segments ('.', '..') are not accepted in the path")
        if not seg and i < last:
            raise _bad_path(target, "empty path segments ('//') are not accepted")
    try:
        text = decoded.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad_path(target, "the path is not valid UTF-8") from None
    return text, query


def _bad_path(target: bytes, why: str) -> ProxyError:
    shown = target[:200].decode("latin-1")
    return ProxyError(400, f"Invalid request path {shown!r}: {why}", "invalid_path")


def json_depth_exceeds(value: Any, limit: int) -> bool:
    """Whether ``value`` nests containers deeper than ``limit`` (iterative, stops early)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if d > limit:
            return True
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values() if isinstance(x, (dict, list)))
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v if isinstance(x, (dict, list)))
    return False


class RequestPolicy:
    """Turns a client request into the ``ProxyRequest`` the chain walks, or refuses it."""

    def __init__(self, cfg: ProxyConfig) -> None:
        self.cfg = cfg
        self.max_body = cfg.max_body_bytes
        self.max_depth = cfg.limits.max_json_depth
        self.request_timeout_s = cfg.request_timeout_s
        exact: set[str] = set()
        prefixes: list[str] = []
        for ep in cfg.allowed_endpoints:
            if ep.endswith("/*"):
                prefixes.append(ep[:-1])
            else:
                exact.add(ep)
        self._exact = frozenset(exact)
        self._prefixes = tuple(prefixes)
        self._checked: dict[tuple[str, bytes], str] = {}  # (method, target) -> path

    def allowed(self, path: str) -> bool:
        return path in self._exact or (bool(self._prefixes) and path.startswith(self._prefixes))

    def check_path(self, method: str, target: bytes) -> str:
        """The normalised path of an allowed endpoint and method, or a ProxyError."""
        key = (method, target)
        path = self._checked.get(key)
        if path is not None:
            return path
        path, _ = normalise_path(target)
        if not path.startswith("/v1/"):
            raise ProxyError(
                404,
                f"Unknown path {path!r}: this port serves the OpenAI API under /v1/ "
                "(e.g. /v1/chat/completions, /v1/models)",
                "unknown_path",
            )
        if not self.allowed(path):
            raise ProxyError(
                404,
                f"Endpoint {path!r} is not forwarded by this proxy (proxy.allowed_endpoints)",
                "endpoint_not_allowed",
            )
        if method not in METHODS:
            raise ProxyError(
                405, f"Method {method} is not supported on {path}", "method_not_allowed"
            )
        if len(self._checked) >= _PATH_CACHE_MAX:
            self._checked.clear()
        self._checked[key] = path
        return path

    def forwarded_headers(
        self, headers: list[tuple[bytes, bytes]]
    ) -> tuple[list[tuple[bytes, bytes]], bytes]:
        """The headers fit to forward (in order, repeated ones kept), and the content
        type. Hop-by-hop headers are not forwarded: the fixed ones, and those the
        client's ``Connection`` header names. A header Sentinel acts on that can hold
        one value only (``Content-Type``, ``Authorization``) sent twice is refused: the
        upstream could read the other one (the first) than Sentinel did."""
        fwd = []
        ctype: bytes | None = None
        auth = False
        hop: set[bytes] | None = None
        for kv in headers:
            k = kv[0]
            if k not in DROP_REQUEST_HEADERS:
                fwd.append(kv)
                if k == b"content-type":
                    if ctype is not None:
                        raise _duplicate("Content-Type")
                    ctype = kv[1]
                elif k == b"authorization":
                    if auth:
                        raise _duplicate("Authorization")
                    auth = True
            elif k == b"connection":
                hop = (hop or set()) | {n.strip().lower() for n in kv[1].split(b",")}
        if hop is not None:
            fwd = [(k, v) for k, v in fwd if k not in hop]
        return fwd, ctype or b""

    def parse_body(
        self, path: str, method: str, ctype: bytes, body: bytes
    ) -> tuple[Any, Any, bool]:
        """The JSON payload (or None), the model (or None), and whether it asks to stream."""
        payload: dict[str, Any] | None = None
        model: str | None = None
        stream = False
        if body and (not ctype or b"json" in ctype or b"text/" in ctype):
            try:
                # strict JSON in one C call (a tenth of the json module's time); what it
                # refuses goes the json module's way: its exact error for the client,
                # and what that module accepts beyond strict JSON (NaN) accepted as before
                parsed = _decode_json(body)
            except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
                parsed = self._parse_json(body)
            # a body with fewer brackets than the limit cannot nest deeper than it
            if (
                isinstance(parsed, (dict, list))
                and body.count(b"{") + body.count(b"[") > self.max_depth
                and json_depth_exceeds(parsed, self.max_depth)
            ):
                raise self._too_deep()
            if isinstance(parsed, dict):
                payload = parsed
                m = parsed.get("model")
                model = m if isinstance(m, str) else None
                stream = parsed.get("stream") is True
            elif path in MODEL_PATHS:
                raise ProxyError(400, "Request body must be a JSON object", "invalid_body")
        if method == "POST" and path in MODEL_PATHS:
            if payload is None:
                raise ProxyError(
                    400, f"{path} needs a JSON body with a 'model' field", "missing_body"
                )
            if not model:
                raise ProxyError(
                    400,
                    "you must provide a model parameter ('model': a non-empty string)",
                    "missing_model",
                    param="model",
                )
        return payload, model, stream

    def _parse_json(self, body: bytes) -> Any:
        """The json module's reading of a body (UTF-8 first), or the error naming what is
        wrong with it."""
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProxyError(
                400,
                f"Request body is not valid UTF-8 (bad byte at offset {exc.start})",
                "invalid_utf8",
            ) from None
        try:
            return json.loads(text)
        except RecursionError:
            raise self._too_deep() from None
        except json.JSONDecodeError as exc:
            raise ProxyError(
                400, f"Request body is not valid JSON: {exc}", "invalid_json"
            ) from None
        except ValueError:  # an integer too long to convert (a bound of Python's)
            raise ProxyError(
                400,
                "Request body is not valid JSON: a number in it has too many digits",
                "invalid_json",
            ) from None

    def _too_deep(self) -> ProxyError:
        return ProxyError(
            400,
            f"Request body nests JSON deeper than {self.max_depth} levels "
            "(proxy.limits.max_json_depth)",
            "json_too_deep",
        )

    def proxy_request(
        self,
        rid: str,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        now: float,
    ) -> tuple[ProxyRequest, str, bool]:
        """The request to forward, its normalised path, and whether it streams."""
        path = self.check_path(method, target)
        if len(body) > self.max_body:
            raise ProxyError(
                413,
                f"Request body is {len(body)} bytes, over the limit of {self.max_body} "
                "(proxy.max_body_bytes)",
                "body_too_large",
            )
        fwd, ctype = self.forwarded_headers(headers)
        payload, model, stream = self.parse_body(path, method, ctype, body)
        req = ProxyRequest(
            rid,
            method,
            target.decode("latin-1"),
            fwd,
            body,
            payload,
            model,
            now + self.request_timeout_s,
        )
        return req, path, stream
