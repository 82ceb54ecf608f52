"""Attach mode (issue 18) against the real vLLM engine: one engine per module.

The test plays the engine container and the kubelet: it starts vLLM itself, as a process
tree of its own; Sentinel (`engine.mode: attach`) finds it by its command line and titles,
probes it, scrapes it, fronts it with the proxy; when the engine hangs (EngineCore and
Worker SIGSTOPped), Sentinel dumps the discovered pids and ends the engine's processes;
the test then starts a new engine on the same port, and Sentinel follows its new pids.
Throughout, a decoy whose command line names vLLM and the engine's port (an operator's
shell) is never taken for the engine, nor signalled: only the tree listening on the port is.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from sentinel.config.schema import EngineConfig
from sentinel.engine.command import build_argv
from tests.helpers import wait_for
from tests.real.harness import (
    ENGINE_ARGS,
    ENGINE_START_TIMEOUT,
    ROOT,
    TINY_MODEL,
    SentinelProcess,
)

pytestmark = pytest.mark.real


class EngineContainer:
    """vLLM started the way an engine container would: not Sentinel's child."""

    def __init__(self, tmp: Path, port: int) -> None:
        self.tmp, self.port = tmp, port
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.sessions: list[int] = []  # the engines' session ids (own session each)

    def start(self) -> int:
        cfg = EngineConfig(model=str(TINY_MODEL), served_model_name="tiny", port=self.port,
                           args=list(ENGINE_ARGS))  # fmt: skip
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
        self.starts += 1
        log = open(self.tmp / f"engine-{self.starts}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            build_argv(cfg), env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
            start_new_session=True,
        )  # fmt: skip
        self.sessions.append(self.proc.pid)
        log.close()
        return self.proc.pid

    def processes(self) -> list[psutil.Process]:
        """Every live process of the engine's session (vLLM's titles overwrite the memory
        /proc/PID/environ reads, so the tag cannot find EngineCore and Workers)."""
        out = []
        for sid in self.sessions:
            for p in psutil.process_iter():
                try:
                    if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                        out.append(p)
                except (OSError, psutil.Error):
                    continue
        return out

    def kill_all(self) -> None:
        for p in self.processes():
            try:
                p.kill()
            except psutil.Error:
                pass
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(30)


@pytest.fixture(scope="module")
def attached(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[SentinelProcess, EngineContainer]]:
    tmp = tmp_path_factory.mktemp("attach")
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    s = SentinelProcess(
        tmp,
        {
            "engine": {"mode": "attach",
                       "attach": {"term_grace_s": 3.0, "recovery_holdoff_s": 30.0,
                                  "discover_interval_s": 1.0}},
            "probes": {"on_not_ready": "restart", "not_ready_restart_after_s": 5.0,
                       "on_stall": "report"},
            "incidents": {"dir": str(tmp / "incidents")},
            "watchdogs": {"dump": {"py_spy": py_spy if Path(py_spy).exists() else None}},
        },
    )  # fmt: skip
    engine = EngineContainer(tmp, s.config["engine"]["port"])
    engine.start()
    s.start()
    try:
        yield s, engine
    finally:
        code = s.stop()
        survived = engine.proc is not None and engine.proc.poll() is None
        engine.kill_all()
        assert code == 0, s.log_text()[-3000:]
        assert survived, "stopping Sentinel in attach mode must leave the engine running"


def readyz(s: SentinelProcess) -> int:
    try:
        return s.get("/readyz").status_code
    except httpx.HTTPError:
        return 0


def attach_doc(s: SentinelProcess) -> dict[str, Any]:
    return s.status()["attach"]


def wait_ready_with(s: SentinelProcess, api_pid: int) -> dict[str, Any]:
    def ready() -> bool:
        s.assert_running()
        return readyz(s) == 200 and attach_doc(s)["pids"].get("api_server") == [api_pid]

    wait_for(ready, ENGINE_START_TIMEOUT, interval=1.0, what=f"ready on API server {api_pid}")
    return attach_doc(s)


def test_attached_engine_is_probed_scraped_fronted_and_its_pids_found(attached: Any) -> None:
    s, engine = attached
    doc = wait_ready_with(s, engine.proc.pid)
    assert doc["mode"] == "attach" and doc["problem"] is None
    assert doc["base_url"] == s.engine_url
    assert doc["pids"].get("engine_core") and doc["pids"].get("worker"), doc
    # the discovered pids are the engine's, found by their titles
    by_pid = {p.pid: p.cmdline()[0] for p in engine.processes()}
    assert by_pid[doc["pids"]["engine_core"][0]].startswith("VLLM::EngineCore")
    assert by_pid[doc["pids"]["worker"][0]].startswith("VLLM::Worker")

    # the engine's own series, scraped from its URL (the first scrape follows readiness)
    def scraped() -> str | None:
        text = s.get("/metrics").text
        return text if "vllm_num_requests_running" in text else None

    metrics = wait_for(scraped, 30, interval=0.5, what="the engine's series in /metrics")
    api = engine.proc.pid
    assert f'sentinel_process_resident_memory_bytes{{pid="{api}",role="api_server"}}' in metrics
    assert 'sentinel_engine_restarts_total{reason="not_ready"} 0.0' in metrics
    r = httpx.post(s.proxy_url + "/v1/completions", timeout=60,
                   json={"model": "tiny", "prompt": "hi", "max_tokens": 4})  # fmt: skip
    assert r.status_code == 200, r.text
    status = subprocess.run(
        [sys.executable, "-m", "sentinel", "status", "--url", s.ops_url],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert status.returncode == 0, status.stderr
    assert "attach" in status.stdout and str(api) in status.stdout, status.stdout


def decoy(port: int) -> subprocess.Popen[bytes]:
    """An operator's process whose command line names vLLM and the engine's port (a shell
    in a `kubectl exec` session, `pgrep -f`), not listening on it: never the engine."""
    code = "import time; time.sleep(600)"
    return subprocess.Popen([sys.executable, "-c", code, "vllm", "serve", "--port", str(port)])


def test_hung_engine_is_dumped_ended_and_its_replacement_followed(attached: Any) -> None:
    s, engine = attached
    old_api = engine.proc.pid
    doc = wait_ready_with(s, old_api)
    gen = s.status()["generation"]
    other = decoy(engine.port)  # matches like the engine, names its port, does not listen
    try:
        _hung_engine_is_ended_and_followed(s, engine, old_api, doc, gen, other)
    finally:
        other.kill()
        other.wait()


def _hung_engine_is_ended_and_followed(
    s: SentinelProcess,
    engine: EngineContainer,
    old_api: int,
    doc: dict[str, Any],
    gen: int,
    other: subprocess.Popen[bytes],
) -> None:
    def told_apart() -> bool:  # the engine (listening) is still the one, verified
        d = attach_doc(s)
        return d["pids"].get("api_server") == [old_api] and d["verified"] and not d["problem"]

    wait_for(told_apart, 30, interval=0.5, what="the engine told apart from the decoy")
    assert "sentinel_attach_engine_verified 1.0" in s.get("/metrics").text
    hung = {"engine_core": doc["pids"]["engine_core"][0], "worker": doc["pids"]["worker"][0]}
    for pid in hung.values():
        os.kill(pid, signal.SIGSTOP)
    wait_for(lambda: readyz(s) != 200, 60, interval=0.5, what="readiness to fail")
    # Sentinel ends the engine's processes; the "kubelet" sees its container's main exit
    engine.proc.wait(120)
    wait_for(lambda: not engine.processes(), 60, interval=0.5, what="engine processes gone")
    # the engine is down: the decoy alone matches, is not taken, and lives on
    wait_for(lambda: str(other.pid) in (attach_doc(s)["problem"] or ""), 30, interval=0.5,
             what="the decoy named and not taken")  # fmt: skip
    assert attach_doc(s)["pids"] == {} and other.poll() is None
    metrics = s.get("/metrics").text
    assert 'sentinel_engine_restarts_total{reason="not_ready"} 1.0' in metrics
    assert attach_doc(s)["recoveries"] == {"not_ready": 1}
    # the dumps came first, of the discovered pids (a dump, or exactly why not)
    inc = Path(s.config["incidents"]["dir"])
    dumps = sorted(inc.glob("*-dump-hang_*"))
    assert dumps, sorted(p.name for p in inc.iterdir()) if inc.exists() else "no incidents dir"
    record = json.loads((dumps[-1] / "record.json").read_text())
    by_role = {p["role"]: p for p in record["processes"]}
    for role, pid in hung.items():
        assert by_role[role]["pid"] == pid, record
        assert by_role[role]["ok"] or by_role[role]["error"], record
    # the kubelet restarts the container: a new engine on the same port, new pids
    new_api = engine.start()
    doc = wait_ready_with(s, new_api)
    assert new_api != old_api and doc["pids"]["engine_core"][0] != hung["engine_core"]
    assert s.status()["generation"] > gen
    assert s.serves(base=s.proxy_url)
    assert other.poll() is None, "a process that only looked like the engine was signalled"


def _stream(url: str, out: list[tuple[int, str]]) -> None:
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 48, "ignore_eos": True,
            "stream": True, "temperature": 0}  # fmt: skip
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            out.append((r.status_code, "".join(r.iter_text())))
    except Exception as exc:  # noqa: BLE001 - asserted by the test
        out.append((0, f"{type(exc).__name__}: {exc}"))


def _in_flight(s: SentinelProcess) -> float:
    lines = s.get("/metrics").text.splitlines()
    return sum(float(x.rsplit(" ", 1)[1]) for x in lines
               if x.startswith("sentinel_proxy_in_flight_requests{"))  # fmt: skip


def test_sigterm_drains_in_flight_then_exits_0_and_leaves_the_engine(attached: Any) -> None:
    """Last in the module: Sentinel is stopped here, as the kubelet stops a pod. The
    engine's EngineCore and Worker are held (SIGSTOP) for the moment of the signal, so that
    the requests are in flight whatever the machine's speed, then let go."""
    s, engine = attached
    doc = wait_ready_with(s, engine.proc.pid)
    held = [doc["pids"]["engine_core"][0], doc["pids"]["worker"][0]]
    results: list[tuple[int, str]] = []
    threads = [threading.Thread(target=_stream, args=(s.proxy_url, results), daemon=True)
               for _ in range(8)]  # fmt: skip
    for pid in held:
        os.kill(pid, signal.SIGSTOP)
    try:
        for t in threads:
            t.start()
        wait_for(lambda: _in_flight(s) == 8, 30, interval=0.1, what="8 requests in flight")
        s.proc.send_signal(signal.SIGTERM)
        assert s.get("/readyz", timeout=5).status_code == 503
        late = httpx.post(s.proxy_url + "/v1/completions", timeout=10,
                          json={"model": "tiny", "prompt": "x", "max_tokens": 2})  # fmt: skip
        assert late.status_code == 503 and late.json()["error"]["code"] == "draining", late.text
    finally:
        for pid in held:
            os.kill(pid, signal.SIGCONT)
    for t in threads:
        t.join(120)
    assert sorted(code for code, _ in results) == [200] * 8, results
    assert all(body.rstrip().endswith("data: [DONE]") for _, body in results)
    assert s.proc.wait(60) == 0, s.log_text()[-3000:]
    [began] = [r for r in s.log_records() if r.get("event") == "draining"]
    [over] = [r for r in s.log_records() if r.get("event") == "drain wait over"]
    assert began["in_flight"] == 8 and over["outcome"] == "completed", (began, over)
    assert over["left_in_flight"] == 0
    # the engine was not Sentinel's to stop: it still serves on its own port
    assert engine.proc.poll() is None
    assert httpx.get(s.engine_url + "/health", timeout=10).status_code == 200
