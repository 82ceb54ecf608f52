"""Structured logging: structlog, JSON lines off a terminal, readable on one.

A redaction processor runs before rendering so secrets (API keys, bearer
tokens, authorization headers) never reach the log, whoever logs them.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable, Hashable, MutableMapping
from typing import Any, TextIO

import structlog

from sentinel.config.schema import LogFormat, LoggingConfig

_SECRET_KEYS = re.compile(r"(authorization|api[_-]?key|token|secret|password)", re.I)
_SECRET_VALUES = [
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{8,}"),
    re.compile(r"\bsk-[A-Za-z0-9_-]{8,}"),
    re.compile(r"(?i)(api[_-]?key|token|password|secret)=([^\s&\"']+)"),
]
REDACTED = "[REDACTED]"
# terminal control: OSC (title, OSC 8 links, OSC 52 clipboard writes) and DCS/SOS/PM/APC
# strings up to their terminator, CSI (colours, cursor moves), other escapes, and the C0/C1
# controls except tab and newline
_TERMINAL_CONTROL = re.compile(
    r"\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"
    r"|\x1b[PX^_][^\x1b]*(?:\x1b\\)?"
    r"|\x1b\[[0-?]*[ -/]*[@-~]"
    r"|\x1b[ -~]?"
    r"|[\x00-\x08\x0b-\x1a\x1c-\x1f\x7f-\x9f]"
)


def strip_terminal_controls(text: str) -> str:
    """``text`` without anything a terminal would obey (escape sequences, controls but tab
    and newline): for text from an engine or a server, before anyone's terminal shows it."""
    if text.isprintable():  # the usual case: no control character at all, no regex
        return text
    return _TERMINAL_CONTROL.sub("", text)


def redact_text(text: str) -> str:
    for pat in _SECRET_VALUES:
        if pat.groups >= 2:
            text = pat.sub(lambda m: f"{m.group(1)}={REDACTED}", text)
        else:
            text = pat.sub(REDACTED, text)
    return text


_MAX_DEPTH = 8
_LEFT_ALONE = frozenset({"exc_info", "stack_info"})  # read by structlog's later processors


def _redact_value(val: Any, depth: int = 0) -> Any:
    """``val`` with secret-looking text redacted and every secret-named key's value masked
    whole (whatever its type), through nested dicts and lists."""
    if isinstance(val, str):
        return redact_text(val)
    if depth >= _MAX_DEPTH and isinstance(val, dict | list):
        return REDACTED  # deeper than any event Sentinel logs: nothing is let through
    if isinstance(val, dict):
        return {
            k: REDACTED
            if isinstance(k, str) and _SECRET_KEYS.search(k) and v is not None
            else _redact_value(v, depth + 1)
            for k, v in val.items()
        }
    if isinstance(val, list):
        return [_redact_value(v, depth + 1) for v in val]
    return val


def redact_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: blank secret-named keys (whatever the value's type) and
    secret-looking values, in nested dicts and lists too."""
    for key, val in list(event.items()):
        if key != "event" and _SECRET_KEYS.search(key) and val is not None:
            event[key] = REDACTED
        elif isinstance(val, str | dict | list) and key not in _LEFT_ALONE:
            event[key] = _redact_value(val)
    return event


class LogThrottle:
    """At most one log line per ``key`` per ``every_s`` seconds, for lines a client can cause
    at will (a refused request): a flood of them must not push the evidence of what happened
    before out of the in-memory log ring (``incidents.log_lines``). Count every event in a
    metric; log only when ``allow`` says so.

    ``allow(key)`` is None for a line to leave out, else the fields to add to the line:
    ``{}``, or ``suppressed`` (how many were left out since the key's last line) and
    ``suppressed_over_s`` (over how many seconds). Keys are few (reasons, not clients); past
    ``max_keys`` the oldest is forgotten."""

    def __init__(
        self,
        every_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 256,
    ) -> None:
        self.every_s = every_s
        self._clock = clock
        self._max_keys = max_keys
        self._keys: dict[Hashable, list[float]] = {}  # key -> [logged at, left out since]

    def allow(self, key: Hashable = None) -> dict[str, float] | None:
        now = self._clock()
        slot = self._keys.get(key)
        if slot is not None and now - slot[0] < self.every_s:
            slot[1] += 1
            return None
        extra: dict[str, float] = {}
        if slot is not None and slot[1]:
            extra = {"suppressed": int(slot[1]), "suppressed_over_s": round(now - slot[0], 1)}
        elif slot is None and len(self._keys) >= self._max_keys:
            self._keys.pop(next(iter(self._keys)))
        self._keys[key] = [now, 0]
        return extra


def raised_at(exc: BaseException) -> tuple[type, str, int]:
    """A ``LogThrottle`` key for an exception: its type and the line that raised it (a
    bug is a place in the code; a client can repeat it, but not make up new ones)."""
    tb = exc.__traceback__
    if tb is None:
        return (type(exc), "", 0)
    while tb.tb_next is not None:
        tb = tb.tb_next
    return (type(exc), tb.tb_frame.f_code.co_filename, tb.tb_lineno)


def configure_logging(cfg: LoggingConfig, stream: TextIO | None = None) -> None:
    stream = stream or sys.stderr
    fmt = cfg.format
    if fmt == LogFormat.auto:
        fmt = LogFormat.console if stream.isatty() else LogFormat.json
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == LogFormat.json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    level = logging.getLevelName(cfg.level.upper())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # keep third-party stdlib loggers (uvicorn, httpx) quiet unless debugging
    logging.basicConfig(level=logging.WARNING if level > logging.DEBUG else logging.DEBUG)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
