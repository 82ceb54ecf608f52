"""The payload log's files: ``payloads-<UTC time>-<n>.jsonl`` in one directory, the current
one appended to and rotated at ``max_file_bytes``, the oldest deleted to stay under
``max_total_bytes``. Used by the payload log's writer thread only."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from prometheus_client import Counter

from sentinel.logs import get_logger

log = get_logger(__name__)

PREFIX = "payloads-"
SUFFIX = ".jsonl"


def open_append(path: Path) -> BinaryIO:
    return open(path, "ab")  # noqa: SIM115 (owned by the writer, closed on rotate/stop)


class PayloadFiles:
    """The files of one payload directory, within their size budget."""

    def __init__(
        self,
        directory: Path,
        max_file_bytes: int,
        max_total_bytes: int,
        deleted: Counter,
        opener: Callable[[Path], BinaryIO] = open_append,
    ) -> None:
        self.dir = directory
        self.max_file_bytes = max_file_bytes
        self.max_total_bytes = max_total_bytes
        self.deleted = deleted  # files deleted to stay under the budget
        self._opener = opener
        self._file: BinaryIO | None = None
        self._file_path: Path | None = None
        self._file_size = 0
        self._seq = 0
        self._files: list[tuple[Path, int]] = []  # closed files, oldest first, with sizes

    def disk_bytes(self) -> int:
        return sum(s for _, s in self._files) + self._file_size

    def scan_existing(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            files = sorted(self.dir.glob(f"{PREFIX}*{SUFFIX}"))
            self._files = [(p, p.stat().st_size) for p in files]
        except OSError as exc:
            log.warning("payload_dir_unusable", dir=str(self.dir), error=exc.strerror)
            self._files = []

    def append(self, data: bytes) -> None:
        n = len(data)
        if self._file is not None and self._file_size + n > self.max_file_bytes:
            self._rotate()
        self._make_room(n)
        if self._file is None:
            self._open_new()
        assert self._file is not None
        self._file.write(data)
        self._file_size += n

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def _open_new(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        self._file_path = self.dir / f"{PREFIX}{stamp}-{self._seq:06d}{SUFFIX}"
        self._file = self._opener(self._file_path)
        self._file_size = 0

    def _rotate(self) -> None:
        assert self._file is not None and self._file_path is not None
        self._file.close()
        self._files.append((self._file_path, self._file_size))
        self._file, self._file_path, self._file_size = None, None, 0

    def _make_room(self, n: int) -> None:
        budget = self.max_total_bytes
        while self._files and self.disk_bytes() + n > budget:
            path, _ = self._files.pop(0)
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            self.deleted.inc()

    def _retire_file(self, failed: bool) -> None:
        """Close the current file and count it against the budget. After a failed write
        its tail may be partial, so its size is read back from the disk."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            assert self._file_path is not None
            size = self._file_size
            if failed:
                try:
                    size = self._file_path.stat().st_size
                except OSError:
                    pass
            if size or not failed:
                self._files.append((self._file_path, size))
        self._file, self._file_path, self._file_size = None, None, 0

    def discard_current(self) -> None:
        """After a failed write: close the file and start anew."""
        self._retire_file(failed=True)

    def close(self) -> None:
        self._retire_file(failed=False)
