"""Robust trends and memory limits for the leak watchdog.

Theil-Sen: the median of the slopes between every pair of samples. Up to half of
the samples can be wild (a spike, the drop after an allocator returns memory)
without moving it, where a least-squares fit follows them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import psutil

MAX_POINTS = 120  # 7,140 pairs: ~3 ms of Python per series


def theil_sen(points: Sequence[tuple[float, float]]) -> float | None:
    """Slope (units of y per unit of t) of (t, y) samples; None with fewer than 3."""
    pts = list(points)
    if len(pts) < 3:
        return None
    if len(pts) > MAX_POINTS:  # thin evenly, keeping the last sample
        step = len(pts) / MAX_POINTS
        pts = [pts[int(i * step)] for i in range(MAX_POINTS - 1)] + [pts[-1]]
    slopes = []
    for i, (ti, yi) in enumerate(pts):
        for tj, yj in pts[i + 1 :]:
            if tj > ti:
                slopes.append((yj - yi) / (tj - ti))
    if not slopes:
        return None
    slopes.sort()
    n = len(slopes)
    mid = n // 2
    return slopes[mid] if n % 2 else (slopes[mid - 1] + slopes[mid]) / 2.0


def _read_int(path: Path) -> int | None:
    try:
        raw = path.read_text().strip()
    except OSError:
        return None
    if not raw or raw == "max":
        return None
    try:
        value = int(raw)
    except ValueError:
        return None
    return value if value < (1 << 60) else None  # cgroup v1 "unlimited"


def cgroup_memory(root: Path = Path("/sys/fs/cgroup")) -> tuple[int | None, int | None]:
    """(limit, current usage) of this process's memory cgroup; None where not limited."""
    v2_limit = _read_int(root / "memory.max")
    if (root / "memory.max").exists() or (root / "memory.current").exists():
        return v2_limit, _read_int(root / "memory.current")
    return _read_int(root / "memory" / "memory.limit_in_bytes"), _read_int(
        root / "memory" / "memory.usage_in_bytes"
    )


def memory_headroom() -> tuple[int, int, str]:
    """(limit, bytes left, source): the cgroup's limit where there is one, else the host's."""
    limit, used = cgroup_memory()
    vm = psutil.virtual_memory()
    if limit is not None:
        left = limit - (used if used is not None else vm.total - vm.available)
        return limit, max(0, left), "cgroup"
    return int(vm.total), int(vm.available), "host"


def format_duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "never (not growing)"
    s = int(max(0, seconds))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d{h:02d}h"
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s"
