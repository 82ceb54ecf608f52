"""Sentinel's own recent log lines, kept in memory for snapshot bundles.

A write-through wrapper around the log stream: every line still goes to the
stream at once; the last ``lines`` are also kept (already rendered and redacted).
"""

from __future__ import annotations

from collections import deque
from typing import TextIO


class LogRing:
    def __init__(self, stream: TextIO, lines: int = 500) -> None:
        self.stream = stream
        self._lines: deque[str] = deque(maxlen=lines)
        self._partial = ""

    def write(self, text: str) -> int:
        n = self.stream.write(text)
        buf = self._partial + text
        *done, self._partial = buf.split("\n")
        self._lines.extend(done)
        if len(self._partial) > 65536:
            self._lines.append(self._partial)
            self._partial = ""
        return n

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    def lines(self) -> list[str]:
        return list(self._lines)
