"""Engine output: split into lines, attribute each to a vLLM process role, keep the tail.

vLLM prefixes its log lines with the process that wrote them, e.g.
``(APIServer pid=812) INFO 11-21 15:00:01 [api_server.py:1] ...``,
``(EngineCore pid=901) ...`` / ``(EngineCore_DP0 pid=901)``, ``(Worker pid=950)`` /
``(Worker_TP1 pid=951)`` (``(VllmWorker-0 pid=951)`` early on). Lines without a
prefix (tracebacks, C-level output) inherit the role of the last prefixed line on the same stream.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass

from sentinel.logs import redact_text, strip_terminal_controls

_PREFIX = re.compile(
    r"^.{0,40}?\((?P<name>[A-Za-z][A-Za-z0-9]*)(?:[_-][A-Za-z0-9_-]+)? pid=(?P<pid>\d+)\)"
)
_ROLES = {
    "apiserver": "api_server",
    "mainprocess": "api_server",
    "enginecore": "engine_core",
    "worker": "worker",
    "vllmworker": "worker",  # a worker's multiprocessing name, before it retitles itself
    "dpcoordinator": "coordinator",
}
MAX_LINE_CHARS = 8192


@dataclass(frozen=True)
class EngineLine:
    role: str
    pid: int | None
    stream: str
    text: str


def parse_prefix(text: str) -> tuple[str, int] | None:
    """(role, pid) from a vLLM log prefix, or None when the line has none."""
    m = _PREFIX.match(text)
    if not m:
        return None
    return _ROLES.get(m.group("name").lower(), "other"), int(m.group("pid"))


class LineSplitter:
    """Bytes in, complete lines out. Carriage returns (progress bars) end a line too;
    over-long lines are cut at MAX_LINE_CHARS."""

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self._buf = b""
        self._role: str = "other"
        self._pid: int | None = None

    def feed(self, data: bytes) -> list[EngineLine]:
        self._buf += data
        parts = re.split(rb"\r\n|\r|\n", self._buf)
        self._buf = parts.pop()
        if len(self._buf) > MAX_LINE_CHARS * 4:
            parts.append(self._buf)
            self._buf = b""
        return [line for raw in parts if (line := self._line(raw)) is not None]

    def flush(self) -> list[EngineLine]:
        rest, self._buf = self._buf, b""
        line = self._line(rest) if rest else None
        return [line] if line is not None else []

    def _line(self, raw: bytes) -> EngineLine | None:
        # dropped at ingest: no reader's terminal (`sentinel status --log-tail`, a bundle
        # viewed with cat) obeys an engine line's escapes
        text = strip_terminal_controls(raw.decode("utf-8", errors="replace")).rstrip()
        if not text:
            return None
        if len(text) > MAX_LINE_CHARS:
            text = text[:MAX_LINE_CHARS] + "...[truncated]"
        parsed = parse_prefix(text)
        if parsed:
            self._role, self._pid = parsed
        return EngineLine(self._role, self._pid, self.stream, redact_text(text))


class LogTail:
    """The last N engine lines (all generations), tagged with their generation."""

    def __init__(self, max_lines: int) -> None:
        self._lines: deque[tuple[int, str]] = deque(maxlen=max_lines)

    def append(self, generation: int, text: str) -> None:
        self._lines.append((generation, text))

    def lines(self, generation: int | None = None, last: int | None = None) -> list[str]:
        out = [t for g, t in self._lines if generation is None or g == generation]
        return out[-last:] if last else out
