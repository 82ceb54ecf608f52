"""Explain why an engine generation ended, from its exit status and last log lines.

The result is a short machine label (``reason``) and a sentence for a person
(``cause``) that names the culprit: the port, the model path, the missing package.
"""

from __future__ import annotations

import errno
import re
import signal
import socket
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class Diagnosis:
    reason: str  # port_in_use | model_not_found | missing_module | out_of_memory | ...
    cause: str


@dataclass(frozen=True)
class LaunchContext:
    """What Sentinel asked the engine to do, to name it in explanations."""

    model: str
    host: str
    port: int
    python: str
    managed_port: bool = True


_MODEL_PATTERNS = [
    re.compile(p, re.I)
    for p in (
        r"Repo id must be",
        r"HFValidationError",
        r"is not a local folder and is not a valid model identifier",
        r"Invalid repository ID or local directory",
        r"does not appear to have a file named config\.json",
        r"Can't load the configuration of",
        r"LocalEntryNotFoundError",
        r"cannot find the requested files in the local cache",
        r"Cannot find an appropriate cached snapshot folder",
        r"RepositoryNotFoundError",
        r"No such file or directory: .*config\.json",
        r"Unrecognized model in",
    )
]
_PORT_IN_USE = re.compile(
    r"\[Errno (98|48)\] (error while attempting to bind.*: )?address already in use", re.I
)
_PORT_IN_LINE = re.compile(r"\(\s*'?[\w.:\[\]]*'?,\s*(\d{1,5})\s*\)")
_NO_MODULE = re.compile(r"No module named '([^']+)'")
_OOM = re.compile(
    r"(CUDA out of memory|OutOfMemoryError|torch\.OutOfMemoryError|"
    r"Cannot allocate memory|std::bad_alloc)",
    re.I,
)
_KV = re.compile(
    r"(No available memory for the cache blocks|insufficient.*KV cache|"
    r"KV cache.*(is|are) (too small|not enough)|larger than the maximum number "
    r"of tokens that can be stored in KV cache)",
    re.I,
)
_ARGPARSE = re.compile(r"(error: unrecognized arguments: .*|error: argument .*)$")
_ERRORISH = re.compile(r"(Error|Exception|error:|FATAL|Traceback)")
_FRAME = re.compile(r'^\s*(File "|\^+$|Traceback \(most recent call last\))')


def last_error_line(lines: list[str]) -> str | None:
    """The most telling line of a tail: the last error-looking line that is not a
    traceback frame."""
    for line in reversed(lines):
        if _ERRORISH.search(line) and not _FRAME.search(line):
            return line.strip()
    return None


def describe_exit(code: int | None) -> str:
    if code is None:
        return "exited (status unknown)"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with status {code}"


def diagnose(code: int | None, lines: list[str], ctx: LaunchContext, loaded: bool) -> Diagnosis:
    """Explain a generation's end. ``lines``: its last log lines, oldest first."""
    text = "\n".join(lines)
    err = last_error_line(lines)
    tail_hint = f" (last error: {err})" if err else ""

    if m := _PORT_IN_USE.search(text):
        port = ctx.port if ctx.managed_port else _port_from(lines)
        where = f"port {port} on {ctx.host}" if port else "the engine's port"
        return Diagnosis(
            "port_in_use",
            f"{where} is already in use{holder_hint(port)}; "
            "stop whatever holds it or choose another engine.port",
        )
    if m := _NO_MODULE.search(text):
        pkg = m.group(1)
        return Diagnosis(
            "missing_module",
            f"Python package '{pkg}' is not installed for "
            f"{ctx.python} (ModuleNotFoundError: No module named '{pkg}')",
        )
    if any(p.search(text) for p in _MODEL_PATTERNS):
        return Diagnosis(
            "model_not_found",
            f"model '{ctx.model}' was not found: it is not a "
            "local model directory (with config.json) nor a model available to "
            f"download{tail_hint}",
        )
    if _KV.search(text):
        return Diagnosis(
            "insufficient_kv_cache_memory",
            "not enough memory for the KV cache; "
            f"lower --max-model-len or raise the cache space{tail_hint}",
        )
    if _OOM.search(text):
        return Diagnosis("out_of_memory", f"the engine ran out of memory{tail_hint}")
    for line in reversed(lines):
        if m := _ARGPARSE.search(line):
            return Diagnosis("bad_engine_args", f"the engine rejected its arguments: {m.group(1)}")
    what = describe_exit(code)
    if code is not None and code < 0:
        return Diagnosis("killed", f"the engine's API server {what}")
    phase = "" if loaded else " during start-up"
    return Diagnosis("crashed", f"the engine {what}{phase}{tail_hint}")


def _port_from(lines: list[str]) -> int | None:
    for line in reversed(lines):
        if m := _PORT_IN_LINE.search(line):
            return int(m.group(1))
    return None


def holder_hint(port: int | None) -> str:
    """' (held by pid 12, python)' when the listening process can be seen, else ''."""
    if not port:
        return ""
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return ""
    for c in conns:
        if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid:
            try:
                name = psutil.Process(c.pid).name()
            except psutil.Error:
                name = "?"
            return f" (held by pid {c.pid}, {name})"
    return ""


def port_in_use(host: str, port: int) -> bool:
    """True when nothing of ours could bind host:port now (something listens there)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            # anything else (a privileged port, an address not on this host) is
            # left for the engine to report
            return exc.errno == errno.EADDRINUSE
    return False
