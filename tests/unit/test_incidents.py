"""Incidents: the store's budget, py-spy dumps of a real Python process (a named
function shows in the saved dump), rate limiting, and snapshot bundles that hold
every part and no secret."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from sentinel.config import SentinelConfig
from sentinel.config.schema import DumpConfig, IncidentsConfig
from sentinel.incidents.capture import Capturer, Target
from sentinel.incidents.pyspy import PySpy, parse_threads
from sentinel.incidents.snapshot import SnapshotBuilder
from sentinel.incidents.store import IncidentStore
from sentinel.watchdogs.metrics import WatchdogMetrics

SPIN = """
import time
def p17_unit_spin_marker():
    while True:
        time.sleep(0.01)
p17_unit_spin_marker()
"""

needs_pyspy = pytest.mark.skipif(PySpy(DumpConfig()).executable is None, reason="no py-spy")


@pytest.fixture
def spinner():
    proc = subprocess.Popen([sys.executable, "-c", SPIN])
    time.sleep(0.5)
    yield proc
    proc.kill()
    proc.wait()


def test_store_removes_oldest_beyond_count_and_size(tmp_path: Path) -> None:
    t = [1_000_000.0]
    store = IncidentStore(
        IncidentsConfig(
            dir=tmp_path, max_count=3, max_total_bytes=64 * 1024 + 10, max_bundle_bytes=64 * 1024
        ),
        clock=lambda: t[0],
    )
    made = []
    for i in range(5):
        t[0] += 1
        d = store.new_dir("dump", f"Reason {i}!")
        (d / "x.txt").write_text("x" * 100)
        made.append(d)
        store.enforce_budget(keep=d)
    names = [p.name for p in store.entries()]
    assert names == [p.name for p in made[-3:]]  # oldest went first
    assert all("reason_" in n for n in names)  # file-name-safe labels
    t[0] += 1
    big = store.new_file_path("snapshot", "big", ".tar.gz")
    big.write_bytes(b"y" * (64 * 1024))
    store.enforce_budget(keep=big)
    assert store.entries()[-1] == big and store.summary()["bytes"] <= 64 * 1024 + 10


def test_parse_threads_reads_py_spy_text() -> None:
    text = (
        "Process 1: python\nPython v3.11.7\n\n"
        'Thread 11 (active+gil): "MainThread"\n    spin (x.py:3)\n    <module> (x.py:5)\n\n'
        'Thread 12 (idle): "agent"\n    wait (threading.py:1)\n'
    )
    threads = parse_threads(text)
    assert [t["name"] for t in threads] == ["MainThread", "agent"]
    assert threads[0]["frames"] == ["spin (x.py:3)", "<module> (x.py:5)"]


@needs_pyspy
def test_dump_of_a_live_process_shows_its_function(spinner, tmp_path: Path) -> None:
    registry = CollectorRegistry()
    metrics = WatchdogMetrics(registry)
    store = IncidentStore(IncidentsConfig(dir=tmp_path))
    cap = Capturer(
        PySpy(DumpConfig()),
        store,
        metrics,
        lambda: [Target(spinner.pid, "worker")],
        min_interval_s=60,
    )
    first = asyncio.run(cap.capture("cpu_busy_gpu_idle", "test"))
    assert first is not None and first.path is not None
    dump = (first.path / f"worker-{spinner.pid}.txt").read_text()
    assert "p17_unit_spin_marker" in dump
    record = json.loads((first.path / "record.json").read_text())
    assert record["reason"] == "cpu_busy_gpu_idle"
    assert record["processes"][0]["role"] == "worker" and record["processes"][0]["ok"]
    assert any("p17_unit_spin_marker" in f for f in record["processes"][0]["top_frames"])
    # automatic captures are rate-limited; an operator's is not
    assert asyncio.run(cap.capture("cpu_busy_gpu_idle", "again")) is None
    assert asyncio.run(cap.capture("operator", "", automatic=False)) is not None
    get = registry.get_sample_value
    assert get("sentinel_dumps_total", {"reason": "cpu_busy_gpu_idle", "outcome": "ok"}) == 1
    assert (
        get("sentinel_dumps_total", {"reason": "cpu_busy_gpu_idle", "outcome": "rate_limited"}) == 1
    )


@needs_pyspy
def test_stopped_process_is_read_without_suspending_it(spinner) -> None:
    os.kill(spinner.pid, signal.SIGSTOP)
    try:
        res = asyncio.run(PySpy(DumpConfig()).dump(spinner.pid, "engine_core"))
    finally:
        os.kill(spinner.pid, signal.SIGCONT)
    assert res.ok, res.error
    assert "p17_unit_spin_marker" in res.text
    assert res.nonblocking and "could not be suspended" in res.error


def test_missing_py_spy_and_gone_process_say_why(tmp_path: Path) -> None:
    missing = PySpy(DumpConfig(py_spy=str(tmp_path / "no-such-py-spy")))
    res = asyncio.run(missing.dump(os.getpid(), "api_server"))
    assert not res.ok and res.outcome == "unavailable" and "pip install py-spy" in res.error
    ok, detail = asyncio.run(missing.check_permission())
    assert not ok and "py-spy" in detail
    if PySpy(DumpConfig()).executable is not None:
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        res = asyncio.run(PySpy(DumpConfig()).dump(gone.pid, "worker"))
        assert not res.ok and res.error


@needs_pyspy
def test_permission_check_passes_here() -> None:
    ok, detail = asyncio.run(PySpy(DumpConfig()).check_permission())
    assert ok, detail


def test_snapshot_holds_every_part_and_no_secret(tmp_path: Path, monkeypatch) -> None:
    hf, ext, admin = "hf_p17unitSECRETvalue", "sk-p17-external-unit-key", "admin-token-p17-unit-xyz"
    monkeypatch.setenv("HF_TOKEN", hf)
    monkeypatch.setenv("P17_EXT_KEY", ext)
    cfg = SentinelConfig.model_validate(
        {
            "engine": {"env": {"HF_TOKEN": hf, "OTHER": "1"}, "args": ["--api-key", ext]},
            "proxy": {
                "tiers": [
                    {"name": "local", "kind": "local"},
                    {"name": "ext", "base_url": "http://x", "api_key_env": "P17_EXT_KEY"},
                ]
            },
            "incidents": {"dir": str(tmp_path / "inc")},
        }
    )
    builder = SnapshotBuilder(
        cfg,
        IncidentStore(cfg.incidents),
        status=lambda: {"state": "stalled", "note": f"token={admin}"},
        metrics=lambda: b"sentinel_up 1\n",
        engine_log=lambda: [f"engine line {i} HF={hf}" for i in range(100)],
        sentinel_log=lambda: [f'{{"event": "x", "k": "{ext}"}}'],
        restarts=lambda: {"restarts": [{"reason": "stalled"}]},
        extra_secrets=lambda: [admin],
    )
    path = builder.build("operator", None, "py-spy is not installed")
    out = tmp_path / "x"
    with tarfile.open(path) as tar:
        tar.extractall(out, filter="data")
    (root,) = list(out.iterdir())
    parts = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    for part in (
        "manifest.json", "status.json", "config.yaml", "logs/sentinel.log", "logs/engine.log",
        "stacks/README.txt", "gpu.json", "metrics.txt", "restarts.json", "versions.json",
        "host.json",
    ):  # fmt: skip
        assert part in parts, parts
    manifest = json.loads((root / "manifest.json").read_text())
    assert "py-spy" in manifest["missing_or_cut"]["stacks"]
    host = json.loads((root / "host.json").read_text())
    assert host["open_files_limit"] and "dev_shm_bytes" in host
    assert "engine line 99" in (root / "logs/engine.log").read_text()
    for p in root.rglob("*"):
        if p.is_file():
            text = p.read_text()
            for secret in (hf, ext, admin):
                assert secret not in text, (p, secret)


def test_snapshot_is_bounded(tmp_path: Path) -> None:
    cfg = SentinelConfig.model_validate(
        {"incidents": {"dir": str(tmp_path), "max_bundle_bytes": 128 * 1024, "log_lines": 100000}}
    )
    noise = os.urandom(4000).hex()  # incompressible
    builder = SnapshotBuilder(
        cfg,
        IncidentStore(cfg.incidents),
        status=dict,
        metrics=bytes,
        engine_log=lambda: [noise] * 200,
        sentinel_log=lambda: [noise] * 200,
        restarts=dict,
    )
    path = builder.build("operator", None)
    with tarfile.open(path) as tar:
        total = sum(m.size for m in tar.getmembers())
        manifest = json.loads(
            tar.extractfile(
                next(m for m in tar.getmembers() if m.name.endswith("manifest.json"))
            ).read()  # type: ignore[union-attr]
        )
    assert total <= 128 * 1024
    assert "logs" in manifest["missing_or_cut"]


@pytest.mark.parametrize("limit", [64 * 1024, 256 * 1024])
def test_bundle_file_never_exceeds_max_bundle_bytes(tmp_path: Path, limit: int) -> None:
    """Many stack dumps each under a quarter of the budget, a big metrics text of
    multi-byte characters, incompressible logs, at the smallest allowed limit too: the
    .tar.gz on disk stays within incidents.max_bundle_bytes, the manifest says what was cut."""
    from sentinel.incidents.capture import Capture
    from sentinel.incidents.pyspy import DumpResult

    cfg = SentinelConfig.model_validate(
        {"incidents": {"dir": str(tmp_path), "max_bundle_bytes": limit, "log_lines": 5000}}
    )

    def noise(n: int) -> str:
        return os.urandom(n // 2).hex()  # incompressible-ish text

    stacks = [
        DumpResult(pid=1000 + i, role="worker", ok=True, seconds=0.1, text=noise(limit // 6))
        for i in range(12)
    ]
    capture = Capture("operator", "", time.time(), stacks)
    builder = SnapshotBuilder(
        cfg,
        IncidentStore(cfg.incidents),
        status=lambda: {"note": noise(limit // 5)},
        metrics=lambda: ("é" * (limit // 3) + noise(limit // 3)).encode(),
        engine_log=lambda: [noise(300) for _ in range(2000)],
        sentinel_log=lambda: [noise(300) for _ in range(2000)],
        restarts=dict,
    )
    path = builder.build("operator", capture)
    assert path.stat().st_size <= limit, (path.stat().st_size, limit)
    with tarfile.open(path) as tar:
        names = [m.name.split("/", 1)[1] for m in tar.getmembers()]
        manifest = json.loads(
            tar.extractfile(
                next(m for m in tar.getmembers() if m.name.endswith("manifest.json"))
            ).read()  # type: ignore[union-attr]
        )
    assert "manifest.json" in names and "stacks/record.json" in names
    assert manifest["missing_or_cut"], manifest


def test_budget_touches_only_sentinels_own_entries(tmp_path: Path) -> None:
    (tmp_path / "00-not-an-incident" / "sub").mkdir(parents=True)
    (tmp_path / "00-not-an-incident" / "sub" / "data.bin").write_text("x")
    (tmp_path / "README").write_text("someone else's file")
    (tmp_path / ".other-tool.tmp").write_text("not ours")
    store = IncidentStore(IncidentsConfig(dir=tmp_path, max_count=1))
    first = store.new_dir("dump", "operator")
    kept = store.new_dir("dump", "operator")
    assert store.enforce_budget(keep=kept) == [first]
    assert store.entries() == [kept] and store.summary()["count"] == 1
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([".other-tool.tmp", "00-not-an-incident", "README", kept.name])
    assert (tmp_path / "00-not-an-incident" / "sub" / "data.bin").read_text() == "x"


def test_failed_snapshot_write_leaves_no_partial_file(tmp_path: Path, monkeypatch) -> None:
    cfg = SentinelConfig.model_validate({"incidents": {"dir": str(tmp_path)}})
    stale = tmp_path / ".20260101T000000.000Z-snapshot-operator-1.tar.gz.tmp"
    stale.write_bytes(b"partial from a crash")
    (tmp_path / ".foreign.tar.gz.tmp").write_bytes(b"not ours")
    store = IncidentStore(cfg.incidents)
    assert not stale.exists()  # a crash's leftover goes when the store starts
    builder = SnapshotBuilder(
        cfg, store, status=dict, metrics=bytes, engine_log=list, sentinel_log=list, restarts=dict
    )
    real_addfile = tarfile.TarFile.addfile

    def disk_full(self, info, fileobj=None):  # write a little, then fail like a full disk
        real_addfile(self, info, fileobj)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tarfile.TarFile, "addfile", disk_full)
    with pytest.raises(OSError):
        builder.build("operator", None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".foreign.tar.gz.tmp"]
    monkeypatch.undo()
    stale.write_bytes(b"partial")
    path = builder.build("operator", None)
    assert not stale.exists()  # enforcing the budget removes it too
    assert sorted(p.name for p in tmp_path.iterdir()) == [".foreign.tar.gz.tmp", path.name]
