"""Turning one request's facts into one redacted, size-capped JSON line.

A metadata-only line (every request) is built when the request ends, on the event
loop: a few microseconds, cheaper than handing the raw facts to the writer thread,
which would have to take the GIL from the loop to format them. A sampled line (bodies
redacted and truncated) is built on the writer thread.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from sentinel.logs import REDACTED, redact_text

SECRET_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "api-key", "x-api-key", "cookie", "set-cookie"}
)
# any other header whose name says it holds a secret: X-Goog-Api-Key, X-Auth-Token, ...
_SECRET_HEADER = re.compile(r"key|token|secret|auth|passw|credential|cookie", re.I)
# a JSON member whose name says it holds a secret: "api_key": "...", "password": "...";
# the value is a whole JSON string (escaped quotes included), or the rest of a cut body
_SECRET_MEMBER = (
    r'("[A-Za-z0-9_.-]*(?:api[_-]?key|access[_-]?key|private[_-]?key|token|secret|passw(?:or)?d'
    r'|authorization|credentials?)"\s*:\s*)'
)
_JSON_SECRET = re.compile(
    _SECRET_MEMBER + r'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)',
    re.I | re.S,
)
# the same names with any other value (object, array, number, true/false): masked whole
_JSON_SECRET_OTHER = re.compile(_SECRET_MEMBER + r"(?=[\[{0-9tfn-])", re.I)
_SCALAR_END = re.compile(r"[^,}\]\s]*")
_STRING_END = re.compile(r'"(?:[^"\\]|\\.)*(?:"|\\?\Z)', re.S)


def _value_end(text: str, i: int) -> int:
    """Where the JSON value starting at ``i`` ends (the text's end when it is cut)."""
    if text[i] not in "[{":
        return _SCALAR_END.match(text, i).end()  # type: ignore[union-attr]
    depth, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == '"':
            i = _STRING_END.match(text, i).end()  # type: ignore[union-attr]
            continue
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return n


def _mask_other_values(text: str) -> str:
    out: list[str] = []
    pos = 0
    for m in _JSON_SECRET_OTHER.finditer(text):
        if m.start() < pos:  # inside a value already masked
            continue
        out += (text[pos : m.end()], f'"{REDACTED}"')
        pos = _value_end(text, m.end())
    if not out:
        return text
    out.append(text[pos:])
    return "".join(out)


_USAGE = re.compile(rb'"usage"\s*:\s*(\{[^{}]*\})')
_USAGE_KEYS = re.compile(rb'"(prompt_tokens|completion_tokens|total_tokens)"\s*:\s*(\d+)[,}\s]')
_CACHE_MAX = 1024


class Redactor:
    def __init__(self, patterns: list[str]) -> None:
        self._extra = [re.compile(p) for p in patterns]
        self._cache: dict[str, str] = {}

    def cached(self, text: str) -> str:
        """``text()`` for the few strings seen on every request (upstream URLs)."""
        out = self._cache.get(text)
        if out is None:
            out = self.text(text)
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[text] = out
        return out

    def text(self, text: str) -> str:
        text = redact_text(text)
        text = _JSON_SECRET.sub(lambda m: m.group(1) + f'"{REDACTED}"', text)
        text = _mask_other_values(text)
        for pat in self._extra:
            text = pat.sub(REDACTED, text)
        return text

    def headers(self, headers: dict[str, str]) -> dict[str, str]:
        return {
            k: (
                REDACTED
                if k.lower() in SECRET_HEADERS or _SECRET_HEADER.search(k)
                else self.text(v)
            )
            for k, v in headers.items()
        }


def usage_of(body: bytes, streamed: bool) -> dict[str, int] | None:
    """prompt/completion tokens from an OpenAI response (the last usage object wins)."""
    data = body[-65536:] if streamed else body
    at = data.rfind(b'"usage"')
    while at >= 0:
        m = _USAGE.match(data, at)
        if m is not None:
            found = {k.decode(): int(v) for k, v in _USAGE_KEYS.findall(m.group(1))}
            return found or None
        at = data.rfind(b'"usage"', 0, at)
    return None


def _decode(body: bytes) -> str:
    return body.decode("utf-8", errors="replace")


_MARK = "...[truncated]"
# Bodies are cut to the record's cap plus this margin before they are decoded and
# redacted: redaction never runs over a 4 MiB body, and a secret that the cut splits
# lies beyond the cap, so the final truncation drops what is left of it.
CLIP_MARGIN = 4096
MAX_HEADERS = 128


def clip(body: bytes | None, max_bytes: int) -> bytes | None:
    """At most ``max_bytes + CLIP_MARGIN`` bytes of ``body`` (its head)."""
    if body is None or len(body) <= max_bytes + CLIP_MARGIN:
        return body
    return body[: max_bytes + CLIP_MARGIN]


def clip_headers(headers: dict[str, str], max_bytes: int) -> dict[str, str]:
    """At most MAX_HEADERS headers, each value cut like a body."""
    limit = max_bytes + CLIP_MARGIN
    out = {}
    for i, (k, v) in enumerate(headers.items()):
        if i >= MAX_HEADERS:
            break
        out[k[:limit]] = v[:limit]
    return out


# compact JSON, non-ASCII kept as UTF-8 (msgspec: a tenth of the json module's time,
# which counts on the request path, where every request's metadata line is made)
_ENCODE = msgspec.json.Encoder().encode


def _dumps(obj: Any) -> str:
    return _ENCODE(obj).decode()


def _enc_len(text: str) -> int:
    return len(_dumps(text).encode())


def _fit(text: str, budget: int) -> str:
    """The longest prefix of text (plus a marker) whose JSON encoding fits budget bytes."""
    if _enc_len(text) <= budget:
        return text
    lo, hi = 0, min(len(text), budget)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _enc_len(text[:mid] + _MARK) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo] + _MARK if lo else ""


def cap_record(record: dict[str, Any], max_bytes: int) -> str:
    """Serialize ``record``; truncate its bodies (marked) so the line fits ``max_bytes``."""
    line = _dumps(record)
    if len(line) * 4 <= max_bytes or len(line.encode()) <= max_bytes:  # UTF-8: <= 4 B/char
        return line
    record["truncated"] = True
    keys = [k for k in ("request_body", "response_body") if isinstance(record.get(k), str)]
    bodies = {k: record[k] for k in keys}
    for k in keys:
        record[k] = ""
    room = max_bytes - len(_dumps(record).encode())
    for _ in range(8):
        if room <= 0 or not keys:
            break
        # share the room: a body smaller than its half leaves the rest to the other
        sizes = {k: _enc_len(bodies[k]) for k in keys}
        share = room // len(keys)
        small = [k for k in keys if sizes[k] <= share]
        budgets = {k: sizes[k] for k in small}
        rest = room - sum(budgets.values())
        big = [k for k in keys if k not in small]
        for k in big:
            budgets[k] = rest // len(big)
        for k in keys:
            record[k] = _fit(bodies[k], budgets[k] + 2)  # +2: the quotes already counted
        line = _dumps(record)
        if len(line.encode()) <= max_bytes:
            return line
        room -= max(64, room // 10)
    for k in ("request_body", "response_body", "request_headers", "error"):
        record.pop(k, None)
    return _dumps(record)


def build_line(
    meta: dict[str, Any],
    request_headers: dict[str, str] | None,
    request_body: bytes | None,
    response_body: bytes | None,
    usage_source: bytes | None,
    streamed: bool,
    with_bodies: bool,
    redactor: Redactor,
    max_bytes: int,
) -> str:
    record = dict(meta)
    if usage_source:
        usage = usage_of(usage_source, streamed)
        if usage:
            record["prompt_tokens"] = usage.get("prompt_tokens")
            record["completion_tokens"] = usage.get("completion_tokens")
            record["tokens_source"] = "usage"
    if "upstream" in record and isinstance(record["upstream"], str):
        record["upstream"] = redactor.cached(record["upstream"])
    if "error" in record and isinstance(record["error"], str):
        record["error"] = redactor.text(record["error"])
    if with_bodies:
        # cut first, then redact, then fit the line to its cap
        record["sampled"] = True
        if request_headers is not None:
            record["request_headers"] = redactor.headers(clip_headers(request_headers, max_bytes))
        record["request_body"] = redactor.text(_decode(clip(request_body, max_bytes) or b""))
        record["response_body"] = redactor.text(_decode(clip(response_body, max_bytes) or b""))
    return cap_record(record, max_bytes)
