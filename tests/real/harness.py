"""Run `sentinel run` as a real subprocess against real vLLM on the CPU.

Every test that needs the real engine goes through ``SentinelProcess``: it
writes a config (free loopback ports, the tiny model), starts Sentinel, and
offers the calls the tests need (ops endpoints, completions, the process tree).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from tests.helpers import free_port, is_guard, json_records, wait_for

ROOT = Path(__file__).resolve().parents[2]
TINY_MODEL = ROOT / "var" / "tiny-model"
ENGINE_START_TIMEOUT = float(os.environ.get("SENTINEL_TEST_ENGINE_TIMEOUT", "420"))


ENGINE_TAG_VAR = "ENGINE_TEST_TAG"


def engine_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return (TINY_MODEL / "model.safetensors").exists()


# float32: vLLM's CPU attention kernel for bfloat16 uses AMX where the CPU advertises it,
# and dies with SIGILL on VMs that advertise AMX without enabling it (seen on these
# machines after a VM migration); the vector kernel float32 takes works everywhere
ENGINE_ARGS = ["--max-model-len", "256", "--enforce-eager", "--dtype", "float32"]


def base_config(tmp: Path) -> dict[str, Any]:
    return {
        "engine": {
            "model": str(TINY_MODEL),
            "served_model_name": "tiny",
            "port": free_port(),
            "args": list(ENGINE_ARGS),
            "env": {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"},
        },
        "supervisor": {"backoff_initial_s": 0.5, "backoff_max_s": 5.0, "stop_grace_s": 15.0},
        "probes": {"interval_s": 1.0, "timeout_s": 2.0, "freshness_s": 4.0},
        "ops": {"host": "127.0.0.1", "port": free_port()},
        "proxy": {"host": "127.0.0.1", "port": free_port()},
        "payload_log": {"dir": str(tmp / "payloads")},
        "logging": {"format": "json", "level": "info"},
        "lifecycle": {"runtime_dir": str(tmp / "run")},
    }


def deep_update(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        else:
            base[k] = v
    return base


class SentinelProcess:
    def __init__(
        self,
        tmp: Path,
        overrides: dict[str, Any] | None = None,
        extra_args: list[str] | None = None,
        wrapper: list[str] | None = None,
    ) -> None:
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.config = deep_update(base_config(tmp), overrides or {})
        # every engine process inherits this variable: finds them anywhere, orphans too
        self.tag = f"{os.getpid()}-{self.config['engine']['port']}-{id(self)}"
        self.config["engine"].setdefault("env", {})[ENGINE_TAG_VAR] = self.tag
        self.config_path = tmp / "sentinel.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.log_path = tmp / "sentinel.log"
        self.extra_args = extra_args or []
        self.wrapper = wrapper or []
        self.proc: subprocess.Popen[bytes] | None = None

    # ---- lifecycle -----------------------------------------------------------
    def start(self) -> SentinelProcess:
        cmd = [
            *self.wrapper,
            sys.executable,
            "-m",
            "sentinel",
            "run",
            "--config",
            str(self.config_path),
            *self.extra_args,
        ]
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> SentinelProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- addresses -----------------------------------------------------------
    @property
    def ops_url(self) -> str:
        return f"http://127.0.0.1:{self.config['ops']['port']}"

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.config['proxy']['port']}"

    @property
    def engine_url(self) -> str:
        return f"http://127.0.0.1:{self.config['engine']['port']}"

    # ---- observations ----------------------------------------------------------
    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_records(self) -> list[dict[str, Any]]:
        return json_records(self.log_path)

    def get(self, path: str, base: str | None = None, timeout: float = 5) -> httpx.Response:
        return httpx.get((base or self.ops_url) + path, timeout=timeout)

    def status(self) -> dict[str, Any]:
        return self.get("/status").json()

    def engine_healthy(self) -> bool:
        try:
            return httpx.get(self.engine_url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def complete(
        self, base: str | None = None, max_tokens: int = 8, timeout: float = 30, **extra: Any
    ) -> httpx.Response:
        body = {
            "model": "tiny",
            "prompt": "hello",
            "max_tokens": max_tokens,
            "temperature": 0,
            **extra,
        }
        return httpx.post((base or self.engine_url) + "/v1/completions", json=body, timeout=timeout)

    def serves(self, base: str | None = None) -> bool:
        try:
            r = self.complete(base=base, max_tokens=4, timeout=10)
        except httpx.HTTPError:
            return False
        return r.status_code == 200 and bool(r.json()["choices"][0]["text"] is not None)

    def assert_running(self) -> None:
        """Fail at once, with the end of its log, when Sentinel has exited (a wait on the
        engine would otherwise run to its timeout)."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(
                f"sentinel exited {self.proc.returncode}:\n{self.log_text()[-4000:]}"
            )

    def wait_serving(self, timeout: float = ENGINE_START_TIMEOUT, base: str | None = None) -> None:
        def ok() -> bool:
            self.assert_running()
            return self.serves(base)

        wait_for(ok, timeout, interval=1.0, what="the engine to serve completions")

    # ---- the process tree ------------------------------------------------------
    def sentinel_pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def engine_tree(self) -> list[psutil.Process]:
        """Every process below Sentinel (the engine generation and any re-parented orphan)."""
        try:
            procs = psutil.Process(self.sentinel_pid()).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        return [p for p in procs if not is_guard(p)]

    def engine_processes_anywhere(self) -> list[psutil.Process]:
        """Every live process on the machine started for this Sentinel's engine, wherever
        it was re-parented (found by the tag variable in its environment)."""
        out = []
        for p in psutil.process_iter():
            try:
                if (
                    p.environ().get(ENGINE_TAG_VAR) == self.tag
                    and p.status() != psutil.STATUS_ZOMBIE
                ):
                    out.append(p)
            except psutil.Error:
                continue
        return out

    def engine_processes_by_role(self) -> dict[str, list[psutil.Process]]:
        roles: dict[str, list[psutil.Process]] = {}
        for p in self.engine_tree():
            try:
                roles.setdefault(role_of(p), []).append(p)
            except psutil.NoSuchProcess:
                continue
        return roles


def role_of(p: psutil.Process) -> str:
    """vLLM sets process titles: VLLM::EngineCore, VLLM::Worker...; the API server keeps python."""
    name = " ".join(p.cmdline()[:1]) or p.name()
    if "EngineCore" in name:
        return "engine_core"
    if "Worker" in name:
        return "worker"
    if "api_server" in " ".join(p.cmdline()):
        return "api_server"
    return "other"


def all_processes_matching(marker: str) -> list[psutil.Process]:
    """Processes anywhere on the machine whose cmdline contains marker (orphan hunting)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if marker in " ".join(p.info["cmdline"] or []):
                out.append(p)
        except psutil.NoSuchProcess:
            continue
    return out


def wait_gone(pids: list[int], timeout: float) -> float:
    """Wait until none of pids is alive (zombies count as gone); return the time it took."""
    t0 = time.monotonic()

    def gone() -> bool:
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    return False
            except psutil.NoSuchProcess:
                continue
        return True

    wait_for(gone, timeout, interval=0.05, what=f"pids {pids} to exit")
    return time.monotonic() - t0
