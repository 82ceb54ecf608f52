"""`sentinel run -- <fake engine>` with the proxy: drain on SIGTERM, the admin API's
drain/resume/restart through the CLI, Sentinel's own death (guard, state file).

The real-engine proofs are in tests/real/test_lifecycle.py; these run in seconds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from tests.helpers import fake_piddir, free_port, is_guard, json_records, live_fakes, wait_for

FAKE = Path(__file__).with_name("test_engine_fake.py")
ROOT = Path(__file__).resolve().parents[2]
TOKEN = "lifecycle-test-admin-token-0123456789"


class LRun:
    def __init__(
        self,
        tmp: Path,
        mode: str = "serve",
        over: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        runtime_dir: Path | None = None,
        engine_port: int | None = None,
    ) -> None:
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.port = engine_port or free_port()
        self.ops_port, self.proxy_port = free_port(), free_port()
        (tmp / "token").write_text(TOKEN)
        self.piddir = fake_piddir(tmp)  # each fake process registers itself here
        fake_env = {"FAKE_TAG": str(self.port), "FAKE_PIDDIR": str(self.piddir), **(env or {})}
        self.cfg: dict[str, Any] = {
            "engine": {"port": self.port, "env": fake_env},
            "supervisor": {"backoff_initial_s": 0.2, "stop_grace_s": 5.0, "kill_grace_s": 0.5},
            "probes": {"interval_s": 0.2, "timeout_s": 2.0, "freshness_s": 2.0},
            "ops": {
                "host": "127.0.0.1",
                "port": self.ops_port,
                "admin": {"token_file": str(tmp / "token")},
            },
            "proxy": {"host": "127.0.0.1", "port": self.proxy_port},
            "payload_log": {"enabled": False, "dir": str(tmp / "payloads")},
            "gpu": {"mode": "off"},
            "logging": {"format": "json"},
            "lifecycle": {"runtime_dir": str(runtime_dir or tmp / "run"), "drain_timeout_s": 10},
        }
        for section, values in (over or {}).items():
            self.cfg.setdefault(section, {}).update(values)
        self.config_path = tmp / "sentinel.yaml"
        self.config_path.write_text(yaml.safe_dump(self.cfg))
        self.log_path = tmp / "sentinel.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        cmd = [sys.executable, "-m", "sentinel", "run", "--config", str(self.config_path)]
        cmd += ["--", sys.executable, str(FAKE), mode, str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        _RUNS.append(self)

    @property
    def ops(self) -> str:
        return f"http://127.0.0.1:{self.ops_port}"

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    def records(self) -> list[dict[str, Any]]:
        return json_records(self.log_path)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("event") == name]

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"sentinel exited {self.proc.returncode}\n{self.tail()}")
            try:
                return httpx.get(self.ops + "/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            wait_for(ready, timeout, interval=0.1, what="ready")
        except AssertionError as exc:  # with the log as it is then, not as it was before
            raise AssertionError(f"{exc}\n{self.tail()}") from None

    def fakes(self) -> list[psutil.Process]:
        """Live fake-engine processes anywhere (tests.helpers.live_fakes: by environment
        and by pidfile, orphans too) plus Sentinel's engine tree."""
        procs = {p.pid: p for p in live_fakes(str(self.port), self.piddir)}
        try:
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                if not is_guard(p) and alive(p):
                    procs[p.pid] = p
        except psutil.Error:
            pass
        return list(procs.values())

    def complete(self, sleep: float = 0.0, timeout: float = 30) -> httpx.Response:
        body: dict[str, Any] = {"model": "fake", "prompt": "hi", "max_tokens": 1}
        if sleep:
            body["x_sleep"] = sleep
        return httpx.post(self.proxy + "/v1/completions", json=body, timeout=timeout)

    def in_flight(self) -> int:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        return int(httpx.get(self.ops + "/admin/drain", headers=auth).json()["in_flight"])

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sentinel", *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )

    def admin(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.cli(*args, "--config", str(self.config_path))


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


_RUNS: list[LRun] = []


@pytest.fixture(autouse=True)
def _no_leftovers() -> Iterator[None]:
    yield
    while _RUNS:
        run = _RUNS.pop()
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait(10)
        for p in run.fakes():
            p.kill()
        run._log.close()


def _in_background(fn: Any, n: int) -> tuple[list[threading.Thread], list[Any]]:
    out: list[Any] = []

    def one() -> None:
        try:
            out.append(fn())
        except Exception as exc:  # noqa: BLE001 - reported by the test's asserts
            out.append(exc)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    return threads, out


def test_sigterm_drains_in_flight_requests_then_stops_api_server_first(tmp_path: Path) -> None:
    # a grace long enough to see the order (the default after a drain is short)
    over = {"lifecycle": {"engine_grace_after_drain_s": 5.0, "runtime_dir": str(tmp_path / "run")}}
    run = LRun(tmp_path, env={"FAKE_TERM_DELAY": "0.5"}, over=over)
    run.wait_ready()
    wait_for(lambda: len(run.fakes()) == 3, 10, what="3 fake engine processes")
    procs = run.fakes()
    threads, results = _in_background(lambda: run.complete(sleep=1.5), 4)
    wait_for(
        lambda: (
            httpx.get(
                run.ops + "/admin/drain", headers={"Authorization": f"Bearer {TOKEN}"}
            ).json()["in_flight"]
            == 4
        ),
        10,
        what="4 requests in flight",
    )
    t0 = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: httpx.get(run.ops + "/readyz", timeout=2).status_code == 503, 2, interval=0.02)
    readyz = httpx.get(run.ops + "/readyz", timeout=2).json()
    assert "drain" in readyz["failed"] and readyz["state"] == "draining"
    late = run.complete()
    assert late.status_code == 503 and late.headers["retry-after"] == "5"
    assert late.json()["error"]["code"] == "draining"
    for t in threads:
        t.join(20)
    assert [getattr(r, "status_code", r) for r in results] == [200] * 4
    assert run.proc.wait(20) == 0, run.tail()
    elapsed = time.monotonic() - t0
    assert not any(alive(p) for p in procs)
    wait = run.events("drain wait over")
    assert wait and wait[0]["outcome"] == "completed" and wait[0]["left_in_flight"] == 0
    # TERM went to the API server alone; EngineCore only once the API server had exited
    terms = {
        r["role"]: float(r["line"].rsplit(" ", 1)[1])
        for r in run.events("engine")
        if "got SIGTERM" in r.get("line", "")
    }
    assert set(terms) >= {"api_server", "engine_core"}, terms
    assert terms["engine_core"] - terms["api_server"] >= 0.45
    assert elapsed < 10, elapsed
    assert not (tmp_path / "run" / f"engine-{run.port}.json").exists()


def test_second_sigterm_skips_the_drain(tmp_path: Path) -> None:
    run = LRun(tmp_path)
    run.wait_ready()
    procs = run.fakes()
    threads, results = _in_background(lambda: run.complete(sleep=8), 1)
    time.sleep(0.5)
    run.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    t0 = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    run.proc.wait(10)
    assert time.monotonic() - t0 < 5
    assert run.events("drain wait over")[0]["outcome"] == "skipped"
    for t in threads:
        t.join(10)
    assert not any(alive(p) for p in procs)


def test_admin_drain_resume_and_restart_through_the_cli(tmp_path: Path) -> None:
    run = LRun(tmp_path)
    run.wait_ready()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    bad = httpx.post(run.ops + "/admin/drain?wait=maybe", headers=auth)
    assert bad.status_code == 400 and "wait must be true or false" in bad.json()["error"]
    bad = httpx.post(run.ops + "/admin/restart?force=1", headers=auth)
    assert bad.status_code == 400 and "force" in bad.json()["error"]
    assert httpx.get(run.ops + "/readyz").status_code == 200  # neither did anything
    r = run.admin("drain", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["draining"] is True and doc["drain"]["by_hand"] is True
    assert httpx.get(run.ops + "/readyz").status_code == 503
    assert run.complete().status_code == 503  # no next tier: refused
    metrics = httpx.get(run.ops + "/metrics").text
    assert "sentinel_drain_active 1.0" in metrics
    r = run.admin("resume")
    assert r.returncode == 0 and "taking traffic" in r.stdout, r.stderr
    wait_for(lambda: httpx.get(run.ops + "/readyz").status_code == 200, 10)
    assert run.complete().status_code == 200
    # resume when not draining: a clear refusal, not a traceback
    r = run.admin("resume")
    assert r.returncode == 1 and "not draining" in r.stderr and "Traceback" not in r.stderr
    gen = httpx.get(run.ops + "/status").json()["generation"]
    r = run.admin("restart")
    assert r.returncode == 0 and "restarted" in r.stdout, r.stderr + r.stdout
    st = httpx.get(run.ops + "/status").json()
    assert st["generation"] == gen + 1 and st["drain"] is None
    assert st["restart_counts"].get("operator") == 1
    assert run.complete().status_code == 200
    # wrong token: refused with its own exit status, counted
    (tmp_path / "bad").write_text("x" * 40)
    r = run.cli("drain", "--url", run.ops, "--token-file", str(tmp_path / "bad"))
    assert r.returncode == 3 and "401" in r.stderr
    assert (
        'sentinel_admin_auth_failures_total{reason="wrong"} 1.0'
        in httpx.get(run.ops + "/metrics").text
    )
    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(20) == 0


def test_an_admin_token_with_a_line_break_stops_start_up_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad-token"
    bad.write_text("abcdefghij012345\nsecond-line-xyz\n")
    run = LRun(tmp_path / "r", over={"ops": {"admin": {"token_file": str(bad)}}})
    assert run.proc.wait(60) == 2, run.tail()
    tail = run.tail()
    assert "ops.admin.token_file" in tail and "line break" in tail, tail
    assert "second-line" not in tail and "Traceback" not in tail
    assert run.fakes() == []  # refused before any engine was started


def test_sentinel_run_lifts_its_open_file_limit_to_fit_the_connection_caps(
    tmp_path: Path,
) -> None:
    """Started with a soft nofile limit of 1024 (a common default), ``sentinel run``
    lifts it so that every connection its caps allow (proxy 2048 + ops 256) fits."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip("hard open-file limit below 4096")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        run = LRun(tmp_path)  # inherits the low limit
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    run.wait_ready()
    limit = psutil.Process(run.proc.pid).rlimit(psutil.RLIMIT_NOFILE)
    assert limit[0] >= 2048 + 256, limit


def test_sigkill_of_sentinel_leaves_no_engine_process(tmp_path: Path) -> None:
    run = LRun(tmp_path)
    run.wait_ready()
    wait_for(lambda: len(run.fakes()) == 3, 10, what="3 fake engine processes")
    state_file = tmp_path / "run" / f"engine-{run.port}.json"

    def recorded() -> dict[str, Any]:
        return json.loads(state_file.read_text())

    roles = {"api_server", "engine_core", "worker"}
    wait_for(lambda: {p["role"] for p in recorded()["processes"]} >= roles, 15, what="roles")
    state = recorded()
    assert all(p["start_ticks"] > 0 and p["cmdline"] for p in state["processes"])
    procs = run.fakes()
    run.proc.kill()
    run.proc.wait(5)
    t0 = time.monotonic()
    wait_for(lambda: not any(alive(p) for p in procs), 2.0, interval=0.05, what="no engine process")
    assert time.monotonic() - t0 < 2.0
    wait_for(lambda: not state_file.exists(), 5, what="the guard to remove the state file")
    guard = run.events("sentinel died without stopping the engine; guard killed its processes")
    # the API server died of its parent-death signal; the guard killed its children
    children = {p["pid"] for p in state["processes"] if p["role"] != "api_server"}
    assert guard and set(guard[0]["killed"]) >= children


def test_next_start_kills_what_an_earlier_sentinel_left(tmp_path: Path) -> None:
    rt = tmp_path / "rt"
    first = LRun(tmp_path / "a", runtime_dir=rt)
    first.wait_ready()
    wait_for(lambda: len(first.fakes()) == 3, 10, what="3 fake engine processes")
    state_file = rt / f"engine-{first.port}.json"
    wait_for(lambda: len(json.loads(state_file.read_text())["processes"]) == 3, 15, what="recorded")
    # the guard dies first (as in a container's cgroup kill that spares nothing but
    # the engine's orphans): only the state file is left to find them by
    guard = next(p for p in psutil.Process(first.proc.pid).children() if is_guard(p))
    procs = first.fakes()
    guard.kill()
    first.proc.kill()
    first.proc.wait(5)
    time.sleep(0.5)
    left = [p for p in procs if alive(p)]
    # the API server died with Sentinel (parent-death signal); its EngineCore (and Worker)
    # were orphaned
    assert left, "the fake EngineCore/Worker should outlive a SIGKILLed Sentinel"
    assert first.proc.pid not in {p.pid for p in left}
    second = LRun(tmp_path / "b", runtime_dir=rt, engine_port=first.port)
    second.wait_ready()
    killed = second.events("killed engine processes an earlier Sentinel left behind")
    assert killed and set(killed[0]["pids"]) >= {p.pid for p in left}
    assert killed[0]["earlier_sentinel_pid"] == first.proc.pid
    # killed before the launch
    records = second.records()
    i_killed = records.index(killed[0])
    i_started = next(i for i, r in enumerate(records) if r.get("event") == "engine started")
    assert i_killed < i_started
    assert not any(alive(p) for p in left)
    second.proc.send_signal(signal.SIGTERM)
    assert second.proc.wait(20) == 0


def test_a_second_sentinel_on_the_same_engine_port_refuses_to_start(tmp_path: Path) -> None:
    rt = tmp_path / "rt"
    first = LRun(tmp_path / "a", runtime_dir=rt)
    first.wait_ready()
    second = LRun(tmp_path / "b", runtime_dir=rt, engine_port=first.port)
    assert second.proc.wait(30) == 2
    assert "another Sentinel" in second.tail() and str(first.proc.pid) in second.tail()
    assert first.proc.poll() is None and httpx.get(first.ops + "/readyz").status_code == 200


def test_preemption_notice_drains_stops_the_engine_and_stays_up(tmp_path: Path) -> None:
    notice = tmp_path / "preempt-notice"
    run = LRun(
        tmp_path, over={"lifecycle": {"preemption": {"file": str(notice), "poll_interval_s": 0.1}}}
    )
    run.wait_ready()
    procs = run.fakes()
    threads, results = _in_background(lambda: run.complete(sleep=1.0), 2)
    wait_for(lambda: run.in_flight() == 2, 10, what="2 requests in flight")
    notice.write_text("node is being reclaimed")
    wait_for(lambda: httpx.get(run.ops + "/readyz").status_code == 503, 2, interval=0.02)
    for t in threads:
        t.join(10)
    assert [getattr(r, "status_code", r) for r in results] == [200, 200]
    wait_for(lambda: not any(alive(p) for p in procs), 20, what="the engine stopped")
    st = httpx.get(run.ops + "/status").json()
    assert st["lifecycle"] == "stopped" and st["drain"]["reason"].startswith("preemption")
    time.sleep(1.0)
    assert run.proc.poll() is None, "Sentinel stays up after a preemption notice"
    assert httpx.get(run.ops + "/status").json()["generation"] == st["generation"]  # no relaunch
    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(10) == 0


def test_bad_input_to_the_lifecycle_commands_is_a_clear_message(tmp_path: Path) -> None:
    run = LRun.__new__(LRun)  # only its CLI helper: no Sentinel needed
    token = tmp_path / "tok"
    token.write_text(TOKEN)
    cases = [
        (["drain", "--bogus"], 2, "No such option"),
        (["restart", "--url", "http://127.0.0.1:9", "--token-file", str(token)], 2, "cannot reach"),
        (["resume", "--token-file", str(tmp_path / "missing")], 2, "does not exist"),
        (["drain"], 2, "no admin token"),
        (["drain", "--config", str(tmp_path / "nope.yaml")], 2, "nope.yaml"),
        (["status", "--log-tail", "5", "--url", "http://127.0.0.1:9"], 2, "no admin token"),
    ]
    for args, code, text in cases:
        r = run.cli(*args)
        assert r.returncode == code, (args, r.returncode, r.stderr)
        assert text in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr, (args, r.stderr)


def test_after_a_completed_drain_the_engine_gets_a_short_grace_and_exit_is_clean(
    tmp_path: Path,
) -> None:
    """An API server that ignores TERM (as vLLM's teardown takes ~13 s): after a drain that
    left nothing in flight it is KILLed after engine_grace_after_drain_s, not stop_grace_s,
    and Sentinel exits 0 (a clean stop)."""
    run = LRun(tmp_path, mode="ignore_term", over={"supervisor": {"stop_grace_s": 20.0}})
    run.wait_ready()
    t0 = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(15) == 0, run.tail()
    assert time.monotonic() - t0 < 10  # not the 20 s stop grace
    ended = run.events("engine generation terminated")[0]
    assert ended["seconds"] < 5 and ended["killed"]
    assert run.events("stopping")[0]["grace_s"] == 0.1
