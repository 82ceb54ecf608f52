"""The incidents directory: one entry (a directory or a .tar.gz) per incident.

Entries are named ``<UTC time>-<kind>-<reason>`` so that a listing reads in time
order; once the count or the total size exceeds its budget, the oldest entries go
first (never the one just written). Only names of that form are Sentinel's: anything
else in the directory (an operator's README, another tool's files) is never listed,
counted or removed. A bundle is written as a hidden ``.<name>.tmp`` and renamed; a
``.tmp`` left by a failed write or a crash is removed when the store starts and when
it enforces its budget.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sentinel.config.schema import IncidentsConfig
from sentinel.logs import get_logger

log = get_logger(__name__)

_UNSAFE = re.compile(r"[^a-z0-9_]+")
# <UTC stamp>.<ms>Z-<kind>-<reason>-<seq>, a directory or a .tar.gz (see IncidentStore._name)
_STEM = r"\d{8}T\d{6}\.\d{3}Z-[a-z0-9_]+-[a-z0-9_]+-\d+"
_ENTRY = re.compile(rf"{_STEM}(\.tar\.gz)?")
_TMP = re.compile(rf"\.{_STEM}(\.tar\.gz)?\.tmp")


def safe_label(text: str, limit: int = 40) -> str:
    """A file-name-safe label: lower case, [a-z0-9_], at most ``limit`` characters."""
    return _UNSAFE.sub("_", text.lower()).strip("_")[:limit] or "unknown"


def entry_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += (Path(root) / name).stat().st_size
            except OSError:
                continue
    return total


class IncidentStore:
    def __init__(self, cfg: IncidentsConfig, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.dir = Path(cfg.dir)
        self._clock = clock
        self._seq = 0
        self._writing: set[Path] = set()  # .tmp files this store is writing now
        self.remove_stale_tmp()

    def _name(self, kind: str, reason: str) -> str:
        now = self._clock()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
        ms = int((now % 1) * 1000)
        self._seq += 1
        return f"{stamp}.{ms:03d}Z-{safe_label(kind)}-{safe_label(reason)}-{self._seq}"

    def new_dir(self, kind: str, reason: str) -> Path:
        """A fresh, empty directory for one incident (the store is created on demand)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / self._name(kind, reason)
        path.mkdir(mode=0o700)
        return path

    def new_file_path(self, kind: str, reason: str, suffix: str) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        return self.dir / (self._name(kind, reason) + suffix)

    @contextmanager
    def writing(self, path: Path) -> Iterator[Path]:
        """A hidden ``.tmp`` to write ``path`` into; it is removed if the write fails
        (the caller renames it to ``path`` on success)."""
        tmp = path.with_name("." + path.name + ".tmp")
        self._writing.add(tmp)
        try:
            yield tmp
        finally:
            self._writing.discard(tmp)
            try:
                tmp.unlink(missing_ok=True)  # gone already once renamed
            except OSError as exc:
                log.warning("cannot remove a partial incident", path=str(tmp), error=str(exc))

    def entries(self) -> list[Path]:
        """Every incident, oldest first (the names sort by time); only Sentinel's names."""
        if not self.dir.is_dir():
            return []
        return sorted(
            (p for p in self.dir.iterdir() if _ENTRY.fullmatch(p.name)),
            key=lambda p: p.name,
        )

    def remove_stale_tmp(self) -> list[Path]:
        """Remove partial bundles (Sentinel's ``.tmp`` names) that no write of this store
        holds open: left by a failed write or a crash."""
        removed: list[Path] = []
        try:
            names = list(self.dir.iterdir()) if self.dir.is_dir() else []
        except OSError:
            return removed
        for path in names:
            if not _TMP.fullmatch(path.name) or path in self._writing:
                continue
            try:
                path.unlink()
            except OSError as exc:
                log.warning("cannot remove a partial incident", path=str(path), error=str(exc))
                continue
            removed.append(path)
        if removed:
            log.info("partial incidents removed", removed=[p.name for p in removed])
        return removed

    def enforce_budget(self, keep: Path | None = None) -> list[Path]:
        """Remove the oldest entries beyond ``max_count`` / ``max_total_bytes``."""
        self.remove_stale_tmp()
        entries = self.entries()
        sizes = {p: entry_size(p) for p in entries}
        total = sum(sizes.values())
        removed: list[Path] = []
        for path in entries:
            if len(entries) - len(removed) <= self.cfg.max_count and total <= (
                self.cfg.max_total_bytes
            ):
                break
            if keep is not None and path == keep:
                continue
            try:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            except OSError as exc:
                log.warning("cannot remove an old incident", path=str(path), error=str(exc))
                continue
            removed.append(path)
            total -= sizes[path]
        if removed:
            log.info(
                "old incidents removed (incidents.max_count / max_total_bytes)",
                removed=[p.name for p in removed],
            )
        return removed

    def summary(self) -> dict[str, object]:
        entries = self.entries()
        return {
            "dir": str(self.dir),
            "count": len(entries),
            "bytes": sum(entry_size(p) for p in entries),
            "latest": entries[-1].name if entries else None,
        }
