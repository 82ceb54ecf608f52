"""Real-GPU tests: skipped where NVML cannot be loaded or sees no GPU."""

from __future__ import annotations

import pytest

from sentinel.collectors.gpu.nvml import NvmlUnavailable, load_nvml


def _gpu_reason() -> str | None:
    try:
        nvml = load_nvml()
    except NvmlUnavailable as exc:
        return str(exc)
    try:
        return None if nvml.device_count() > 0 else "NVML sees no GPU"
    finally:
        nvml.close()


_SKIP = _gpu_reason()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if _SKIP:
                item.add_marker(pytest.mark.skip(reason=f"no GPU: {_SKIP}"))
