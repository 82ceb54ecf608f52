"""Lifecycle against the real engine (issue 16): SIGTERM with 16 streams in flight,
`sentinel restart` under load with a backup tier, Sentinel SIGKILLed (the guard and the
parent-death signal), and a leftover engine killed by the next start.

Each test starts its own Sentinel (each ends it): they are about ending engines."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
import psutil
import pytest

from tests.fake_openai import FakeOpenAI
from tests.helpers import is_guard, wait_for
from tests.real.harness import ENGINE_ARGS, ROOT, SentinelProcess, engine_available

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(not engine_available(), reason="vLLM or the tiny model is not installed"),
]

TOKEN = "real-lifecycle-admin-token-0123456789"
ENGINE = {"args": list(ENGINE_ARGS)}
STREAMS = 16


def _stream(s: SentinelProcess, max_tokens: int, out: list[Any], started: threading.Event) -> None:
    body = {
        "model": "tiny",
        "prompt": "hello",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "temperature": 0,
    }
    try:
        with httpx.stream("POST", s.proxy_url + "/v1/completions", json=body, timeout=120) as r:
            chunks = []
            for text in r.iter_text():
                chunks.append(text)
                started.set()
            out.append((r.status_code, "".join(chunks)))
    except Exception as exc:  # noqa: BLE001 - asserted by the test
        out.append((0, f"{type(exc).__name__}: {exc}"))


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_sigterm_with_16_streams_in_flight_drains_them_then_stops(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    s = SentinelProcess(
        tmp_path_factory.mktemp("sigterm"), {"lifecycle": {"drain_timeout_s": 60}, "engine": ENGINE}
    )
    with s:
        s.wait_serving(base=s.proxy_url)
        procs = s.engine_tree()
        assert len(procs) >= 3
        results: list[Any] = []
        events = [threading.Event() for _ in range(STREAMS)]
        threads = [
            threading.Thread(target=_stream, args=(s, 48, results, ev), daemon=True)
            for ev in events
        ]
        for t in threads:
            t.start()
        wait_for(lambda: all(e.is_set() for e in events), 120, what="16 streams under way")
        s.proc.send_signal(signal.SIGTERM)
        t_signal = time.monotonic()
        # /readyz is 503 from the signal on, and a new request is refused
        first = s.get("/readyz", timeout=5)
        assert first.status_code == 503, first.text
        late = httpx.post(
            s.proxy_url + "/v1/completions",
            json={"model": "tiny", "prompt": "x", "max_tokens": 2},
            timeout=10,
        )
        assert late.status_code == 503 and "retry-after" in late.headers, late.text
        assert late.json()["error"]["code"] == "draining"
        for t in threads:
            t.join(120)
        assert len(results) == STREAMS
        for status, body in results:
            assert status == 200, body[-300:]
            assert body.rstrip().endswith("data: [DONE]"), body[-300:]
        code = s.proc.wait(60)
        exit_s = time.monotonic() - t_signal
        assert code == 0, s.log_text()[-3000:]
        wait_for(lambda: not any(_alive(p) for p in procs), 5, what="every engine process gone")
        assert s.engine_processes_anywhere() == []
        drained = [r for r in s.log_records() if r.get("event") == "drain wait over"]
        assert drained and drained[0]["outcome"] == "completed"
        print(f"SIGTERM -> exit {exit_s:.2f}s, drain waited {drained[0]['seconds']}s for streams")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sentinel", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_restart_under_load_with_a_backup_tier_fails_no_request(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    tmp = tmp_path_factory.mktemp("restart")
    (tmp / "token").write_text(TOKEN)
    with FakeOpenAI("backup", model="tiny") as backup:
        over = {
            "engine": ENGINE,
            "ops": {"admin": {"token_file": str(tmp / "token")}},
            "proxy": {
                "tiers": [
                    {"name": "local", "kind": "local"},
                    {"name": "backup", "base_url": backup.url},
                ]
            },
        }
        s = SentinelProcess(tmp, over)
        with s:
            s.wait_serving()  # the engine itself: through the proxy the backup would answer
            wait_for(lambda: s.get("/readyz").status_code == 200, 60, what="ready")
            gen = s.status()["generation"]
            stop = threading.Event()
            outcomes: list[tuple[int, str]] = []

            def load() -> None:
                with httpx.Client(timeout=60) as c:
                    while not stop.is_set():
                        try:
                            r = c.post(
                                s.proxy_url + "/v1/completions",
                                json={"model": "tiny", "prompt": "hi", "max_tokens": 4},
                            )
                            outcomes.append(
                                (r.status_code, r.headers.get("x-sentinel-upstream", ""))
                            )
                        except httpx.HTTPError as exc:
                            outcomes.append((0, type(exc).__name__))
                        time.sleep(0.05)

            workers = [threading.Thread(target=load, daemon=True) for _ in range(3)]
            for w in workers:
                w.start()
            time.sleep(2)
            r = _cli("restart", "--config", str(s.config_path))
            time.sleep(2)
            stop.set()
            for w in workers:
                w.join(60)
            assert r.returncode == 0, r.stdout + r.stderr
            failed = [o for o in outcomes if o[0] != 200]
            assert not failed, failed[:10]
            tiers = {t for _, t in outcomes}
            assert {"local", "backup"} <= tiers, tiers
            st = s.status()
            assert st["generation"] == gen + 1 and st["drain"] is None
            assert s.get("/readyz").status_code == 200
            after = s.complete(base=s.proxy_url)
            assert after.status_code == 200 and after.headers["x-sentinel-upstream"] == "local"
            print(f"restart under load: {len(outcomes)} requests, none failed; {r.stdout.strip()}")


def test_sigkill_leaves_no_engine_and_next_start_kills_leftovers(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    rt = tmp_path_factory.mktemp("runtime")
    # 1. SIGKILL with the guard: no engine process 2 s later
    a = SentinelProcess(
        tmp_path_factory.mktemp("a"), {"lifecycle": {"runtime_dir": str(rt)}, "engine": ENGINE}
    )
    with a:
        a.wait_serving()
        procs = a.engine_tree()
        assert len(procs) >= 3
        a.proc.kill()
        a.proc.wait(10)
        t0 = time.monotonic()
        wait_for(lambda: not any(_alive(p) for p in procs), 2.0, interval=0.05, what="engine gone")
        print(f"engine gone {time.monotonic() - t0:.2f}s after SIGKILL of Sentinel")
    # 2. no guard (killed first): the orphans are found by the next start
    port = a.config["engine"]["port"]
    b = SentinelProcess(
        tmp_path_factory.mktemp("b"),
        {"lifecycle": {"runtime_dir": str(rt)}, "engine": {**ENGINE, "port": port}},
    )
    with b:
        b.wait_serving()
        procs = b.engine_tree()
        guard = next(p for p in psutil.Process(b.proc.pid).children() if is_guard(p))
        guard.kill()
        b.proc.kill()
        b.proc.wait(10)
        time.sleep(2)
        left = [p for p in procs if _alive(p)]
        assert left, "expected vLLM's EngineCore/Worker to outlive the API server"
        c = SentinelProcess(
            tmp_path_factory.mktemp("c"),
            {"lifecycle": {"runtime_dir": str(rt)}, "engine": {**ENGINE, "port": port}},
        )
        with c:

            def started() -> Any:
                return next(
                    (r for r in c.log_records() if r.get("event") == "engine started"), None
                )

            wait_for(started, 120, what="the next Sentinel's engine started")
            records = c.log_records()
            killed = [
                i
                for i, r in enumerate(records)
                if r.get("event") == "killed engine processes an earlier Sentinel left behind"
            ]
            assert killed, c.log_text()[-3000:]
            assert set(records[killed[0]]["pids"]) >= {p.pid for p in left}
            assert killed[0] < records.index(started())
            assert not any(_alive(p) for p in left)
