"""`sentinel status` against a real ops server (fake engine behind it), and without one."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.helpers import free_port, raw_server, wait_for
from tests.unit.fake_engine import FakeEngine
from tests.unit.ops_thread import OpsThread

FAST = {"interval_s": 0.1, "timeout_s": 0.4, "freshness_s": 2.0, "metrics_interval_s": 0.1}


def sentinel_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sentinel", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "200", "PATH": "/usr/bin"},
    )


@pytest.fixture(scope="module")
def ops():
    with (
        FakeEngine(model="tiny") as eng,
        OpsThread({"engine": {"served_model_name": "tiny"}, "probes": FAST}, eng.url) as o,
    ):
        o.call(o.status.new_generation)
        wait_for(lambda: o.get("/readyz").status_code == 200, 10, what="ready")
        o.call(lambda: o.status.record_restart("stalled", "2 requests running, no tokens"))
        yield o


def test_json_is_the_status_document(ops):
    res = sentinel_cli("status", "--url", ops.url, "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["state"] == "ready" and doc["generation"] == 1
    assert doc["restart_counts"] == {"stalled": 1}


def test_table_for_a_person(ops):
    res = sentinel_cli("status", "--url", ops.url)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "ready" in out
    assert "Readiness checks" in out and "inference_probe" in out
    assert "Probes" in out and "inference" in out
    assert "Restarts" in out and "stalled" in out


def test_unreachable_ops_server_is_a_clear_error():
    url = f"http://127.0.0.1:{free_port()}"
    res = sentinel_cli("status", "--url", url)
    assert res.returncode == 2
    assert f"cannot reach Sentinel's ops server at {url}" in res.stderr
    assert "Traceback" not in res.stderr


def _rendered(doc: dict) -> str:
    import io

    from rich.console import Console

    from sentinel.cli.status import render

    buf = io.StringIO()
    render(doc, Console(file=buf, width=400, force_terminal=True, color_system="truecolor"))
    return buf.getvalue()


def test_engine_text_is_shown_as_itself_not_as_rich_markup():
    # an engine error body quoted in a probe detail: `[/...]` used to crash Rich (MarkupError)
    body = 'HTTP 404 {"detail":"Not Found [/v1/completions]"}'
    link = "[link=https://evil.example]click me[/link] [reverse]x"
    doc = {
        "state": "failed",
        "failure_reason": f"engine said {link}",
        "degraded_reasons": {"probe": body},
        "ready_checks": {"inference_probe": {"ok": False, "detail": body}},
        "probes": {"inference": {"ok": False, "latency_s": 0.1, "age_s": 1.0, "detail": link}},
        "restarts": [{"at": 1.0, "generation": 1, "reason": "stalled", "detail": body}],
        "last_exit": {"generation": 1, "pid": 7, "returncode": 1, "at": 1.0, "cause": link},
        "attach": {"base_url": "http://e", "pids": {}, "problem": body, "last_refusal": link},
    }
    out = _rendered(doc)
    assert "Not Found [/v1/completions]" in out
    assert "[link=https://evil.example]click me[/link]" in out
    assert "\x1b]8;" not in out  # no terminal hyperlink was made


@pytest.mark.parametrize(
    "args",
    [
        ["status"],
        ["status", "--log-tail", "5"],
        ["drain"],
        ["resume"],
        ["restart"],
        ["dump"],
        ["snapshot"],
    ],
)
def test_malformed_url_is_bad_input_named_without_a_traceback(args, tmp_path):
    token = tmp_path / "token"
    token.write_text("x" * 32)
    res = sentinel_cli(*args, "--url", "http://127.0.0.1:8090x", "--token-file", str(token))
    assert res.returncode == 2, res
    assert "bad --url 'http://127.0.0.1:8090x'" in res.stderr
    assert "Traceback" not in res.stderr


def test_malformed_env_url_is_named():
    res = subprocess.run(
        [sys.executable, "-m", "sentinel", "status"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin", "SENTINEL_OPS_URL": "127.0.0.1:8090"},
    )
    assert res.returncode == 2, res
    assert "bad SENTINEL_OPS_URL '127.0.0.1:8090'" in res.stderr
    assert "Traceback" not in res.stderr


def _trickling_server(head: bool):
    """A server that answers 200 with a long body (or a long head), one byte every 0.3 s."""

    def answer(conn: socket.socket, stop: threading.Event) -> None:
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        if not head:
            conn.sendall(b"Content-Type: application/json\r\n")
            conn.sendall(b"Content-Length: 100000\r\n\r\n")
        else:
            conn.sendall(b"X-Slow: ")
        while not stop.is_set():
            conn.sendall(b"a" if head else b" ")
            time.sleep(0.3)

    return raw_server(answer)


@pytest.fixture
def trickler():
    with _trickling_server(head=False) as url:
        yield url


@pytest.mark.parametrize("head", [False, True], ids=["trickled-body", "trickled-headers"])
def test_status_timeout_bounds_the_whole_answer_not_each_read(head):
    with _trickling_server(head) as url:
        res = sentinel_cli("status", "--url", url, "--timeout", "1")
    assert res.returncode == 2, res
    assert "did not answer GET /status in time" in res.stderr


def test_admin_client_timeout_bounds_the_whole_answer(trickler, tmp_path):
    from sentinel.cli.admin_client import AdminCallError, AdminClient

    with AdminClient(trickler, "x" * 32, timeout=1) as client:
        with pytest.raises(AdminCallError, match="did not answer POST /admin/drain in time"):
            client.request("POST", "/admin/drain")
        with pytest.raises(AdminCallError, match="did not send GET /admin/snapshot in time"):
            client.download("/admin/snapshot", tmp_path / "bundle.tar.gz")
    assert not (tmp_path / "bundle.tar.gz").exists()


def test_terminal_controls_from_the_server_never_reach_the_terminal():
    # an engine error body quoted in a probe detail, a log line from an older Sentinel
    osc = "\x1b]52;c;cm0gLXJmIH4K\x07\x1b]0;owned\x1b\\"
    doc = {
        "state": "failed",
        "failure_reason": f"engine said {osc}bye",
        "probes": {"inference": {"ok": False, "latency_s": 0.1, "age_s": 1.0, "detail": osc}},
        "log_tail": [f"(APIServer pid=7) INFO {osc}hello"],
    }
    out = _rendered(doc)
    assert "engine said bye" in out and "(APIServer pid=7) INFO hello" in out
    assert "\x1b]" not in out and "\x07" not in out


@pytest.mark.parametrize("cmd", ["status", "drain", "resume", "restart"])
def test_a_timeout_below_a_tenth_of_a_second_is_bad_input(cmd):
    res = sentinel_cli(cmd, "--timeout", "-1")
    assert res.returncode == 2, res
    assert "--timeout" in res.stderr and "Traceback" not in res.stderr


def test_lifecycle_answer_is_printed_without_terminal_controls(capsys):
    from sentinel.cli.lifecycle import _show

    _show({"state": "draining\x1b]0;owned\x07", "generation": 2}, False, "draining (0 in flight)")
    out = capsys.readouterr().out
    assert "state: draining, generation 2" in out and "\x1b" not in out


ODD_STATUS = {
    "state": "serving",
    "now": "not-a-time",
    "ready": "yes",
    "lifecycle": "serving",
    "lifecycle_since": "yesterday",
    "generation": {"n": 2},
    "generation_started_at": None,
    "loaded_at": "soon",
    "engine_metrics": {"vllm:num_requests_running": "lots", "vllm:kv_cache_usage_perc": 0.5},
    "ready_checks": {"inference_probe": "not-a-dict", "engine_up": {"ok": True}},
    "processes": [{"role": "worker", "pid": "x", "create_time": "x"}, "junk"],
    "probes": {"inference": {"ok": True, "latency_s": "fast", "age_s": None}, "x": 3},
    "restarts": [{"at": "noon", "reason": "stalled"}, None],
    "last_exit": {"at": "then", "signal": None, "returncode": "1", "generation": 1},
    "attach": {"base_url": "http://e", "pids": "none", "verified": "no"},
    "sentinel": "not-a-dict",
    "log_tail": "one line",
}


def test_status_table_never_crashes_on_odd_values():
    """Wrong types where numbers, dicts or lists are expected (a broken or other-version
    server): every section is shown with what can be shown, no TypeError."""
    out = _rendered(ODD_STATUS)
    assert "serving" in out and "lots" in out and "kv_cache_usage_perc=0.5" in out
    assert "fast" in out and "noon" in out and "stalled" in out


def _json_server(doc: dict):
    """A server that answers every request with ``doc`` as JSON."""
    body = json.dumps(doc).encode()

    def answer(conn: socket.socket, _: threading.Event) -> None:
        conn.recv(65536)
        head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        conn.sendall(head.encode() + body)

    return raw_server(answer)


def test_sentinel_status_shows_a_status_with_odd_values_without_a_traceback():
    with _json_server(ODD_STATUS) as url:
        res = sentinel_cli("status", "--url", url)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr and "lots" in res.stdout and "fast" in res.stdout


@pytest.mark.parametrize(
    ("cmd", "says", "least"),
    [
        ("drain", {"lifecycle": {"drain_timeout_s": 500}}, 500),
        (
            "restart",
            {
                "lifecycle": {"drain_timeout_s": 500},
                "supervisor": {"startup_timeout_s": 900, "stop_grace_s": 20},
            },
            1420,
        ),
        ("drain", {}, 120),  # a server that does not say: the fixed default
    ],
)
def test_drain_and_restart_wait_as_long_as_the_server_may_take(
    monkeypatch, tmp_path, cmd, says, least
):
    """Without --timeout, `sentinel drain`/`restart` wait as long as the server's own
    limits allow (lifecycle.drain_timeout_s, and for a restart the engine's stop and
    start), read from its /status, plus a margin: never giving up on a drain that is
    still legitimately running."""
    import typer
    from typer.testing import CliRunner

    from sentinel.cli import admin_client
    from sentinel.cli.lifecycle import register

    app = typer.Typer()
    register(app)
    seen: list[tuple[str, str, float]] = []
    real = admin_client.bounded_request

    def spy(client, method, url, *, timeout, **kw):
        seen.append((method, str(url), timeout))
        return real(client, method, url, timeout=timeout, **kw)

    monkeypatch.setattr(admin_client, "bounded_request", spy)
    token = tmp_path / "token"
    token.write_text("t" * 20)
    with _json_server({"state": "serving", "generation": 1, "config": says}) as url:
        res = CliRunner().invoke(app, [cmd, "--url", url, "--token-file", str(token), "--json"])
    assert res.exit_code == 0, res.output
    waited = [t for method, path, t in seen if method == "POST" and f"/admin/{cmd}" in path]
    assert len(waited) == 1 and least <= waited[0] <= least + 120, seen
