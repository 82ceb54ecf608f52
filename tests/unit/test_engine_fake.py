"""A fake engine for fast supervisor tests (no vLLM): writes vLLM-style log lines,
forks an "EngineCore" that forks a "Worker", and misbehaves on request.

Used as ``python test_engine_fake.py MODE PORT``; importing it defines no tests.

Modes:
  serve        answer /health, /v1/models, /v1/completions on PORT; exit 0 on SIGTERM (children too)
  ignore_term  like serve, but the API server ignores SIGTERM
  crash        print a ModuleNotFoundError traceback and exit 1
  orphan       start the children, then exit 3 leaving them behind
  zombies      start 5 short-lived double-forked grandchildren, then serve
  hang         start the children but never answer HTTP (never loads)

With FAKE_PIDDIR set, every fake process (API server, EngineCore, Worker) writes
``FAKE_PIDDIR/<pid>`` holding its start time in clock ticks before it retitles itself
(setproctitle overwrites /proc/PID/environ, so a tag in the environment cannot find the
EngineCore and Worker): the tests find leftovers, orphans included, with
``tests.helpers.live_fakes``.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAKE_PATH = os.path.abspath(__file__)


def say(role: str, text: str) -> None:
    # one write per line: the API server, EngineCore and Worker share the pipe, and print()
    # unbuffered writes the text and its newline separately (lines would interleave)
    os.write(1, f"({role} pid={os.getpid()}) INFO 11-21 15:00:00 [fake.py:1] {text}\n".encode())


def register() -> None:
    """Leave FAKE_PIDDIR/<pid> = start ticks (/proc/self/stat field 22), if asked to."""
    piddir = os.environ.get("FAKE_PIDDIR")
    if not piddir:
        return
    with open("/proc/self/stat", "rb") as f:
        ticks = f.read().rsplit(b")", 1)[1].split()[19]
    with open(os.path.join(piddir, str(os.getpid())), "wb") as f:
        f.write(ticks)


def retitle(title: str) -> None:
    try:
        import setproctitle
    except ImportError:
        return
    setproctitle.setproctitle(title)


def on_term(role: str, delay: float) -> None:
    """SIGTERM: say so (the order of these lines is checked), exit after ``delay``."""
    say(role, f"got SIGTERM at {time.time():.3f}")
    if delay:
        threading.Timer(delay, lambda: os._exit(0)).start()
    else:
        os._exit(0)


def child_tree() -> int:
    """Fork EngineCore -> Worker; both sleep until TERM/KILL. Returns a pipe's read end
    that gets a byte once the Worker carries its title (all three roles are visible)."""
    up_r, up_w = os.pipe()
    if os.fork() == 0:
        os.close(up_r)
        register()
        retitle("VLLM::EngineCore")
        signal.signal(signal.SIGTERM, lambda *_: on_term("EngineCore", 0.0))
        if os.fork() == 0:
            register()
            retitle("VLLM::Worker")
            signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
            os.write(up_w, b"1")
            os.close(up_w)
            say("Worker", "worker up")
            stuck = os.environ.get("FAKE_STUCK_PATH")
            if stuck:  # a file on a FUSE mount whose daemon never answers: stuck in the kernel
                say("Worker", f"stat {stuck}")
                try:
                    os.stat(stuck)
                except OSError as exc:
                    say("Worker", f"stat failed: {exc}")
            while True:
                time.sleep(1)
        os.close(up_w)
        say("EngineCore", "engine core up")
        while True:
            time.sleep(1)
    os.close(up_w)
    return up_r


class Health(BaseHTTPRequestHandler):
    """/health, /v1/models and a one-token /v1/completions: enough for Sentinel's probes."""

    def _json(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/v1/models":
            self._json(b'{"object": "list", "data": [{"id": "fake", "object": "model"}]}')
            return
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if b'"x_sleep"' in body:  # {"x_sleep": seconds}: a slow completion
            import json

            time.sleep(float(json.loads(body)["x_sleep"]))
        if self.path != "/v1/completions":
            self.send_response(404)
            self.end_headers()
            return
        self._json(
            b'{"object": "text_completion", "model": "fake", "choices": [{"index": 0, '
            b'"text": "x", "finish_reason": "length"}], "usage": {"prompt_tokens": 1, '
            b'"completion_tokens": 1, "total_tokens": 2}}'
        )

    def log_message(self, *args: object) -> None:
        pass


def serve(port: int) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", port), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    say("APIServer", f"serving on port {port}")
    while True:
        time.sleep(1)


def main() -> None:
    mode, port = sys.argv[1], int(sys.argv[2])
    register()
    say("APIServer", f"fake engine mode={mode}")
    if mode == "crash":
        print("Traceback (most recent call last):", file=sys.stderr)
        print('  File "x.py", line 1, in <module>', file=sys.stderr)
        print("ModuleNotFoundError: No module named 'fakepkg'", file=sys.stderr, flush=True)
        sys.exit(1)
    term_delay = float(os.environ.get("FAKE_TERM_DELAY", "0"))
    signal.signal(signal.SIGTERM, lambda *_: on_term("APIServer", term_delay))
    tree_up = child_tree()
    if mode == "orphan":  # exit 1.5 s after all three roles are visible, however slow that is
        select.select([tree_up], [], [], 60)
        time.sleep(1.5)
        sys.exit(3)
    if mode == "zombies":
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # our direct children: auto-reaped
        for _ in range(5):
            if os.fork() == 0:
                if os.fork() == 0:
                    time.sleep(0.3)
                    os._exit(0)
                os._exit(0)
    if mode == "hang":
        while True:
            time.sleep(1)
    if mode == "ignore_term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    serve(port)


if __name__ == "__main__":
    main()
