"""Watchdogs against the real vLLM engine (CPU, tiny model), one Sentinel per module.

The agent's test hook (``SENTINEL_AGENT_TEST_CONTROL``, set only here) makes engine
processes spin in a named function, grow memory, or pause in the collector. Order
matters (pytest keeps file order): the SIGSTOP test replaces the engine and runs last;
the agent-failure test starts its own Sentinel.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import wait_for
from tests.real.conftest import SHARED_OVERRIDES, SentinelFactory
from tests.real.harness import ENGINE_ARGS, ROOT, SentinelProcess, deep_update

pytestmark = pytest.mark.real

ROLES = ("api_server", "engine_core", "worker")
ADMIN_TOKEN = "p17-admin-token-0123456789abcdef"
HF_TOKEN = "hf_p17realSECRETtokenvalue"
EXT_KEY = "sk-p17-real-external-key-123456"
GROW_BYTES_PER_S = 3_000_000
SPIN_FUNCTION = "p17_worker_spin_marker"


class Watched:
    def __init__(self, s: SentinelProcess, control: Path, token_file: Path) -> None:
        self.s = s
        self.control = control
        self.token_file = token_file
        self._actions: list[dict[str, Any]] = []

    def act(self, **action: Any) -> None:
        """An action for the engine generation running now (``root``: its API server's
        pid): the generation that replaces it (the SIGSTOP test) does not replay it."""
        action.setdefault("id", f"a{len(self._actions)}")
        action.setdefault("root", self.s.engine_processes_by_role()["api_server"][0].pid)
        self._actions.append(action)
        tmp = self.control.with_suffix(".tmp")
        tmp.write_text(json.dumps({"actions": self._actions}))
        tmp.replace(self.control)

    def watchdogs(self) -> dict[str, Any]:
        return self.s.status()["watchdogs"]

    def metric(self, name: str, **labels: str) -> float | None:
        text = self.s.get("/metrics").text
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                head, _, value = line.rpartition(" ")
                got = head[len(name) :].strip("{}")
                if sorted(got.split(",")) == sorted(want.split(",")) or (not labels and not got):
                    return float(value)
        return None

    def admin(self, path: str, token: str | None = ADMIN_TOKEN, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.post(self.s.ops_url + path, headers=headers, timeout=60, **kw)

    def cli(self, *args: str, token_file: Path | None = None) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "sentinel", *args, "--url", self.s.ops_url]
        if token_file is not None:
            cmd += ["--token-file", str(token_file)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)


def watched_overrides(tmp: Path) -> dict[str, Any]:
    control = tmp / "control.json"
    token_file = tmp / "admin-token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    return deep_update(
        json.loads(json.dumps(SHARED_OVERRIDES)),
        {
            "engine": {
                "env": {"SENTINEL_AGENT_TEST_CONTROL": str(control), "HF_TOKEN": HF_TOKEN},
                "args": list(ENGINE_ARGS),
            },
            "ops": {"admin": {"token_file": str(token_file)}},
            "proxy": {
                "tiers": [
                    {"name": "local", "kind": "local"},
                    {
                        "name": "external",
                        "base_url": "http://127.0.0.1:9",
                        "api_key_env": "P17_EXTERNAL_KEY",
                    },
                ],
                # a tier that spends a key of its own needs client keys, or this
                "auth": {"allow_anonymous": True},
            },
            "incidents": {"dir": str(tmp / "incidents")},
            "watchdogs": {
                "agent": {"report_interval_s": 0.5},
                "gc": {"pause_limit_s": 0.05},
                "dump": {"min_interval_s": 0},
                "leak": {
                    "interval_s": 1.0,
                    "window_s": 20.0,
                    "min_samples": 8,
                    "growth_limit_bytes_per_hour": 2 * GROW_BYTES_PER_S * 3600 / 3,
                },
                "stuck": {
                    "cpu_only": True,
                    "for_s": 5.0,
                    "interval_s": 1.0,
                    "cpu_busy_ratio": 0.3,
                    "capture_on_not_ready": False,
                },
            },
            "probes": {"on_stall": "restart", "stall_window_s": 4.0, "stall_restart_after_s": 2.0},
        },
    )


@pytest.fixture(scope="module")
def watched(sentinel_factory: SentinelFactory, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("watched-cfg")
    old = {k: os.environ.get(k) for k in ("P17_EXTERNAL_KEY", "HF_TOKEN")}
    os.environ["P17_EXTERNAL_KEY"] = EXT_KEY  # Sentinel inherits both at start
    os.environ["HF_TOKEN"] = HF_TOKEN
    try:
        s = sentinel_factory(watched_overrides(tmp), name="watched")
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    s.wait_serving()
    return Watched(s, tmp / "control.json", tmp / "admin-token")


def _agents(w: Watched) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for p in w.watchdogs()["gc"]["processes"]:
        out.setdefault(p["role"], []).append(p)
    return out


def test_agent_reports_from_every_engine_process(watched: Watched) -> None:
    def all_up() -> bool:
        return all(watched.metric("sentinel_watchdog_agent_up", role=r) == 1.0 for r in ROLES)

    wait_for(all_up, 30, interval=0.5, what="the agent reporting from every role")
    agents = _agents(watched)
    current = {p["pid"]: p["role"] for p in watched.s.status()["processes"]}
    for pid, role in current.items():
        if role in ROLES:
            assert any(a["pid"] == pid and a["disabled"] is None for a in agents[role]), agents
    assert watched.s.serves()
    # the ptrace check ran and says dumps work here
    assert watched.watchdogs()["dumps"]["ptrace_ok"] is True


def test_long_gc_pauses_show_per_role_and_count_over_the_limit(watched: Watched) -> None:
    before = {
        r: watched.metric("sentinel_gc_pauses_over_limit_total", role=r) or 0.0 for r in ROLES
    }
    for role in ("worker", "api_server"):
        watched.act(do="gc_pause", role=role, objects=1_500_000, count=3, every_s=0.3)

    def moved() -> bool:
        return all(
            (watched.metric("sentinel_gc_pauses_over_limit_total", role=r) or 0.0) > before[r]
            for r in ("worker", "api_server")
        )

    wait_for(moved, 90, interval=1.0, what="over-limit pauses counted for worker and api_server")
    for role in ("worker", "api_server"):
        slow = watched.metric(
            "sentinel_gc_pause_seconds_bucket", role=role, gc_generation="2", le="0.05"
        )
        total = watched.metric("sentinel_gc_pause_seconds_count", role=role, gc_generation="2")
        assert total is not None and slow is not None and total - slow >= 1, (role, total, slow)
    logged = [
        r
        for r in watched.s.log_records()
        if r.get("event", "").startswith("garbage-collector pause over the limit")
        and r.get("role") == "worker"
    ]
    assert logged and {"pid", "gc_generation", "seconds"} <= set(logged[-1])
    assert watched.s.serves()


def test_worker_spinning_while_idle_is_caught_and_its_dump_shows_the_function(
    watched: Watched,
) -> None:
    inc = Path(watched.s.config["incidents"]["dir"])
    watched.act(do="spin", role="worker", function=SPIN_FUNCTION, seconds=40)

    def dumped() -> Path | None:
        for d in sorted(inc.glob("*-dump-cpu_busy_gpu_idle-*")):
            for f in d.glob("worker-*.txt"):
                if SPIN_FUNCTION in f.read_text():
                    return d
        return None

    found = wait_for(dumped, 90, interval=1.0, what=f"a saved worker dump showing {SPIN_FUNCTION}")
    record = json.loads((found / "record.json").read_text())
    assert record["reason"] == "cpu_busy_gpu_idle"
    assert {p["role"] for p in record["processes"]} >= set(ROLES)
    saved = [r for r in watched.s.log_records() if r.get("event") == "stack dump saved"]
    assert any(SPIN_FUNCTION in " ".join(r.get("top_frames") or []) for r in saved)
    assert (
        watched.metric("sentinel_dumps_total", reason="cpu_busy_gpu_idle", outcome="ok") or 0
    ) >= 3
    assert watched.s.serves()


def test_memory_growth_in_the_api_server_is_measured(watched: Watched) -> None:
    window = watched.s.config["watchdogs"]["leak"]["window_s"]
    t0 = time.monotonic()
    watched.act(do="grow", role="api_server", bytes_per_s=GROW_BYTES_PER_S, seconds=window + 30)

    def api() -> dict[str, Any] | None:
        procs = watched.watchdogs()["leak"]["processes"]
        return next((p for p in procs if p["role"] == "api_server"), None)

    def leaking() -> dict[str, Any] | None:
        p = api()
        return p if p and p["leaking"] else None

    wait_for(leaking, window + 15, interval=1.0, what="growth detected in the api_server")
    detected_s = time.monotonic() - t0
    assert detected_s <= window + 15
    # once the window holds only growth, the rate is within 25% of the truth
    time.sleep(max(0.0, window - (time.monotonic() - t0)) + 2)
    p = api()
    assert p is not None
    truth = GROW_BYTES_PER_S * 3600
    assert abs(p["rss_growth_bytes_per_hour"] - truth) / truth < 0.25, p
    assert p["time_to_limit_s"] is not None and p["time_to_limit"]
    printed = [
        r
        for r in watched.s.log_records()
        if r.get("event", "").startswith("memory growth") and r.get("role") == "api_server"
    ]
    assert printed and printed[-1].get("time_to_limit"), printed[-1:]
    growth = watched.metric("sentinel_process_memory_growth_bytes_per_second", role="api_server")
    assert growth is not None and growth > GROW_BYTES_PER_S / 2


def test_dump_needs_the_admin_token_and_returns_every_role(watched: Watched, tmp_path) -> None:
    assert watched.admin("/admin/dump", token=None).status_code == 401
    assert watched.admin("/admin/dump", token="wrong-token-0123456789").status_code == 401
    bad = tmp_path / "bad-token"
    bad.write_text("wrong-token-0123456789\n")
    refused = watched.cli("dump", token_file=bad)
    assert refused.returncode == 3 and "refused" in refused.stderr, refused
    missing = watched.cli("dump")
    assert missing.returncode == 2 and "no admin token" in missing.stderr
    assert "Traceback" not in refused.stderr + missing.stderr
    ok = watched.cli("dump", "--json", token_file=watched.token_file)
    assert ok.returncode == 0, ok.stderr
    doc = json.loads(ok.stdout)
    roles = {p["role"] for p in doc["processes"] if p["ok"]}
    assert roles >= set(ROLES), doc["processes"]
    for key, text in doc["stacks"].items():
        assert text and "Thread" in text, key
    one = watched.admin("/admin/dump", json={"role": "worker"}).json()
    assert {p["role"] for p in one["processes"]} == {"worker"}
    assert watched.admin("/admin/dump", json={"role": "nope"}).status_code == 400
    assert watched.admin("/admin/dump", json={"pid": "x"}).status_code == 400


def test_a_flood_of_refused_admin_requests_keeps_the_log_ring(watched: Watched, tmp_path) -> None:
    """700 wrong tokens (more than the 500-line log ring): each is counted, few are logged,
    and a snapshot taken after the flood still holds Sentinel's lines from before it."""
    s = watched.s
    before = watched.metric("sentinel_admin_auth_failures_total", reason="wrong") or 0
    started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # as structlog writes it
    logged0 = len(s.log_records())
    with httpx.Client(timeout=30) as c:
        for i in range(700):
            r = c.post(s.ops_url + "/admin/dump", headers={"Authorization": f"Bearer bad-{i}"})
            assert r.status_code == 401
    assert watched.metric("sentinel_admin_auth_failures_total", reason="wrong") == before + 700
    new = s.log_records()[logged0:]
    assert sum(r.get("event") == "admin request refused" for r in new) <= 1, new[-3:]
    out = tmp_path / "snap.tar.gz"
    res = watched.cli("snapshot", "--output", str(out), token_file=watched.token_file)
    assert res.returncode == 0, res.stderr
    with tarfile.open(out) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("logs/sentinel.log"))
        lines = tar.extractfile(member).read().decode().splitlines()  # type: ignore[union-attr]
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert any(r.get("timestamp", "~") < started for r in records), lines[:3]  # kept
    during = [r for r in records if r.get("timestamp", "") >= started]
    assert sum(r.get("event") == "admin request refused" for r in during) <= 1


def test_drain_and_status_from_the_cli_with_default_timeouts(watched: Watched) -> None:
    """`sentinel drain` without --timeout reads how long it may wait from the server's
    /status (lifecycle.drain_timeout_s) and drains; `sentinel status` draws the real
    document; `sentinel resume` takes traffic again."""
    s = watched.s
    assert s.status()["config"]["lifecycle"]["drain_timeout_s"] > 0
    assert "Worst event loop lag over the last 60 seconds" in s.get("/metrics").text
    res = watched.cli("drain", "--json", token_file=watched.token_file)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["draining"] is True
    try:
        assert s.get("/readyz").status_code == 503
        shown = watched.cli("status")
        assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
        assert "draining" in shown.stdout and "Probes" in shown.stdout, shown.stdout
    finally:
        res = watched.cli("resume", token_file=watched.token_file)
    assert res.returncode == 0 and "taking traffic" in res.stdout, res.stderr
    wait_for(lambda: s.get("/readyz").status_code == 200, 30, what="ready after resume")


def test_snapshot_holds_every_part_and_no_secret(watched: Watched, tmp_path) -> None:
    out = tmp_path / "snap.tar.gz"
    res = watched.cli("snapshot", "--output", str(out), token_file=watched.token_file)
    assert res.returncode == 0, res.stderr
    with tarfile.open(out) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    (root,) = list((tmp_path / "x").iterdir())
    files = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    for part in (
        "manifest.json", "status.json", "config.yaml", "logs/sentinel.log", "logs/engine.log",
        "stacks/record.json", "gpu.json", "metrics.txt", "restarts.json", "versions.json",
        "host.json",
    ):  # fmt: skip
        assert part in files, files
    assert {f.split("/")[1].split("-")[0] for f in files if f.startswith("stacks/") and "-" in f}
    stacks = [f for f in files if f.startswith("stacks/") and f.endswith(".txt")]
    assert {s.split("/")[1].rsplit("-", 1)[0] for s in stacks} >= set(ROLES), stacks
    versions = json.loads((root / "versions.json").read_text())
    assert versions["vllm"] and versions["python"] and "torch_cuda" in versions
    assert (root / "logs/sentinel.log").read_text().count("\n") > 10
    assert "sentinel_gc_pause_seconds" in (root / "metrics.txt").read_text()
    for p in root.rglob("*"):
        if p.is_file():
            text = p.read_text(errors="replace")
            for secret in (HF_TOKEN, EXT_KEY, ADMIN_TOKEN):
                assert secret not in text, (p, secret)


def test_sigstopped_engine_is_dumped_before_it_is_replaced(watched: Watched) -> None:
    s = watched.s
    s.wait_serving()
    gen = s.status()["generation"]
    roles = s.engine_processes_by_role()
    pids = {r: roles[r][0].pid for r in ("engine_core", "worker")}
    inc = Path(s.config["incidents"]["dir"])
    import threading

    def long_stream() -> None:
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 240, "ignore_eos": True,
                "stream": True}  # fmt: skip
        try:
            with httpx.stream("POST", s.engine_url + "/v1/completions", json=body,
                              timeout=httpx.Timeout(5, read=120)) as r:  # fmt: skip
                for _ in r.iter_lines():
                    pass
        except httpx.HTTPError:
            pass

    streams = [threading.Thread(target=long_stream, daemon=True) for _ in range(4)]
    for t in streams:
        t.start()
    time.sleep(0.3)
    for pid in pids.values():
        os.kill(pid, signal.SIGSTOP)
    wait_for(lambda: s.status()["generation"] > gen, 120, interval=1.0, what="the engine replaced")
    hang = sorted(inc.glob("*-dump-hang_*"))
    assert hang, sorted(p.name for p in inc.iterdir())
    record = json.loads((hang[-1] / "record.json").read_text())
    by_role = {p["role"]: p for p in record["processes"]}
    assert set(by_role) >= set(ROLES), record
    for role in ("engine_core", "worker"):
        p = by_role[role]
        assert p["pid"] == pids[role]
        assert p["ok"] or p["error"], p  # a dump, or exactly why not
    snaps = sorted(inc.glob("*-snapshot-hang_*.tar.gz"))
    assert snaps, "no snapshot before the restart"
    evidence = [r for r in s.log_records() if r.get("event", "").startswith("evidence preserved")]
    assert evidence and evidence[-1]["seconds"] < 10
    for t in streams:
        t.join(30)
    s.wait_serving()
