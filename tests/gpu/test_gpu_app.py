"""`sentinel run` on a real GPU: the app's poll thread, its /metrics and the supervisor's
pids working together. The "engine" is the device-to-device copy loop (engine.command),
so no vLLM is needed: the GPU memory it holds must show up under its role, not as a
foreign process."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import wait_for
from tests.real.harness import SentinelProcess

COPY_LOOP = Path(__file__).with_name("copy_loop.py")


def _gpu_samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith("sentinel_gpu_"):
                out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_sentinel_run_attributes_the_engines_gpu_memory(tmp_path: Path) -> None:
    overrides = {
        "engine": {"command": [sys.executable, str(COPY_LOOP), "120", "2"]},
        "gpu": {"poll_interval_s": 0.5},
        "proxy": {"enabled": False},
    }
    with SentinelProcess(tmp_path, overrides) as s:

        def engine_memory() -> dict | None:
            try:
                m = _gpu_samples(s.get("/metrics").text)
            except httpx.HTTPError:  # the ops server is not up yet
                return None
            rows = m.get("sentinel_gpu_engine_memory_bytes", [])
            return m if sum(v for _, v in rows) >= 4 * 1024**3 else None

        m = wait_for(engine_memory, 90, interval=0.5, what="engine GPU memory in /metrics")
        assert m["sentinel_gpu_available"][0][1] == 1.0
        roles = {lab["role"] for lab, v in m["sentinel_gpu_engine_memory_bytes"] if v > 0}
        print(f"\nengine memory by role: {m['sentinel_gpu_engine_memory_bytes']}")
        assert roles and None not in roles
        assert all(v == 0 for _, v in m["sentinel_gpu_foreign_processes"])
        status = s.status()
        assert "gpu" not in status.get("degraded_reasons", {})  # an idle-ish, cool GPU
        events = [r.get("event") for r in s.log_records()]
        assert events.count("gpu telemetry started") == 1
