"""Small helpers shared by unit and real-engine tests."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psutil

T = TypeVar("T")


_GIVEN_PORTS: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (loopback), and never one this process was
    given before: the kernel may hand the same free port to two binds in a row, and a
    test that asks for an engine port and a proxy port would then get one port twice."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _GIVEN_PORTS:
            _GIVEN_PORTS.add(port)
            return port


def wait_for(
    predicate: Callable[[], T], timeout: float, interval: float = 0.1, what: str = "condition"
) -> T:
    """Poll until predicate() is truthy; return its value or raise AssertionError."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def accept_sse(srv: socket.socket) -> socket.socket:
    """Accept one connection on ``srv``, read its request and answer with the head of a
    chunked SSE stream: the caller sends the events (``sse_chunk``) and closes."""
    conn, _ = srv.accept()
    conn.recv(65536)
    conn.sendall(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    return conn


def flood_header(s: socket.socket, timeout: float) -> tuple[bytes, int, float]:
    """Send one endless header on ``s`` in 4 KiB writes (its request line and the header's
    name already sent) until a response head comes back, 64 MiB went out, or ``timeout``
    passed: (what came back, bytes sent, seconds it took)."""
    s.setblocking(False)
    t0 = time.monotonic()
    got = b""
    sent = 0
    while b"\r\n\r\n" not in got and sent < 64 * 1024 * 1024 and time.monotonic() - t0 < timeout:
        try:
            sent += s.send(b"a" * 4096)
        except (BlockingIOError, BrokenPipeError, ConnectionResetError):
            time.sleep(0.001)
        try:
            got += s.recv(65536)
        except BlockingIOError:
            pass
        except ConnectionResetError:
            break
    return got, sent, time.monotonic() - t0


def sse_chunk(event: bytes) -> bytes:
    """One event in HTTP/1.1 chunked framing."""
    return b"%x\r\n%s\r\n" % (len(event), event)


def dechunk(data: bytes) -> bytes:
    """The payload of an HTTP/1.1 chunked body (up to its last, empty chunk)."""
    out, i = bytearray(), 0
    while True:
        j = data.index(b"\r\n", i)
        n = int(data[i:j], 16)
        if n == 0:
            return bytes(out)
        out += data[j + 2 : j + 2 + n]
        i = j + 2 + n + 2


def is_guard(proc: object) -> bool:
    """Sentinel's guard process (sentinel/engine/guard.py): a child of Sentinel that is
    not part of the engine."""
    try:
        return any(a.endswith("guard.py") for a in proc.cmdline()[:4])  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - gone, or not readable: not the guard
        return False


def json_records(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a log file, parsed (other lines skipped)."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def live_fakes(tag: str, piddir: Path | None = None) -> list[psutil.Process]:
    """Live processes of a fake engine (tests/unit/test_engine_fake.py), orphans too: those
    whose environment holds FAKE_TAG=tag (the API server) and those registered in piddir
    (FAKE_PIDDIR; the retitled EngineCore and Worker, whose environ setproctitle clobbers).
    A pidfile counts only while its pid still has the recorded start time (no reused pid)."""
    from sentinel.engine.runstate import start_ticks

    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter() if tag else ():
        try:
            if p.environ().get("FAKE_TAG") == tag:
                found[p.pid] = p
        except psutil.Error:
            continue
    if piddir is not None and piddir.is_dir():
        for f in piddir.iterdir():
            try:
                pid, ticks = int(f.name), int(f.read_bytes())
            except (OSError, ValueError):
                continue
            if start_ticks(pid) == ticks and pid not in found:
                try:
                    found[pid] = psutil.Process(pid)
                except psutil.Error:
                    continue
    out = []
    for p in found.values():
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            continue
    return out


# ---- fake engines (tests/unit/test_engine_fake.py): one registry for the session ----------
FAKE_ENGINE = Path(__file__).resolve().parent / "unit" / "test_engine_fake.py"
_fake_piddirs: list[Path] = []  # every FAKE_PIDDIR handed out in this pytest process


def fake_piddir(tmp: Path) -> Path:
    """A fresh directory for ``FAKE_PIDDIR`` (give it to every fake engine a test starts,
    through ``engine.env`` or the environment): the fake processes register in it, so
    that they are found and killed after the test (``kill_fakes``, run for every test by
    tests/conftest.py) and reported at the session's end when one still lives."""
    path = tmp / f"fakes-{len(_fake_piddirs)}"
    path.mkdir(parents=True, exist_ok=True)
    _fake_piddirs.append(path)
    return path


def fake_piddirs_since(n: int) -> list[Path]:
    return _fake_piddirs[n:]


def fake_piddir_count() -> int:
    return len(_fake_piddirs)


def kill_fakes(piddirs: list[Path]) -> list[tuple[int, str]]:
    """Kill every live fake engine registered in ``piddirs`` (orphans too); return the
    (pid, name) of each found alive."""
    found = []
    for d in piddirs:
        for p in live_fakes("", d):
            try:
                found.append((p.pid, p.name()))
                p.kill()
            except psutil.Error:
                continue
    return found


def unregistered_fakes(since: float) -> list[tuple[int, str]]:
    """Live fake engine API servers of this checkout started after ``since`` (epoch s)
    that registered nowhere (a test gave them no FAKE_PIDDIR): the script is their
    program (``python FAKE MODE PORT``; a Sentinel running one has it later in its
    command line, and is not one). Another pytest session in this checkout may own
    them: report them, never kill them."""
    out = []
    for p in psutil.process_iter(["cmdline", "create_time"]):
        try:
            cmd = p.info["cmdline"] or []
            if len(cmd) < 2 or cmd[1] != str(FAKE_ENGINE) or p.info["create_time"] < since:
                continue
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append((p.pid, " ".join(cmd)[:200]))
        except psutil.Error:
            continue
    return out


@contextlib.contextmanager
def raw_server(answer: Callable[[socket.socket, threading.Event], None]) -> Iterator[str]:
    """A loopback HTTP server of raw bytes, for answers no real server would send:
    ``answer(conn, stop)`` writes whatever it likes on each accepted connection (read the
    request first), which is then closed; ``stop`` is set when the block ends. Yields the
    base URL."""
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                answer(conn, stop)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    finally:
        stop.set()
        srv.close()
