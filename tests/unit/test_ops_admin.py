"""The admin API: token sources, 403 without a token, 401 (counted) with a wrong one,
the right one lets the handler run; /status?log_tail is admin-only, probes stay open."""

from __future__ import annotations

import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sentinel.ops.admin import AdminTokenError, read_token
from tests.helpers import free_port
from tests.unit.ops_thread import OpsThread

TOKEN = "s3cret-admin-token-0123456789"


@pytest.fixture(scope="module")
def ops():
    dead = f"http://127.0.0.1:{free_port()}"
    with OpsThread({}, dead, run_probes=False) as o:
        calls: list[str] = []

        async def poke(request: Request) -> Response:
            calls.append(request.method)
            return JSONResponse({"poked": True})

        o.stack.admin.add("/admin/poke", poke, methods=["POST"])
        o.calls = calls
        yield o


def _post(ops, path, token=None, **kw):
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.post(ops.url + path, headers=headers, timeout=5, trust_env=False, **kw)


def _failures(ops, reason):
    return ops.registry.get_sample_value("sentinel_admin_auth_failures_total", {"reason": reason})


def test_without_a_token_admin_endpoints_are_off_and_say_how_to_turn_them_on(ops):
    ops.stack.auth.set_token(None)
    r = _post(ops, "/admin/poke", token=TOKEN)
    assert r.status_code == 403
    assert "ops.admin.token_file" in r.json()["error"] and "token_env" in r.json()["error"]
    r = ops.get("/status", params={"log_tail": 3})
    assert r.status_code == 403 and "log_tail" not in r.json()
    assert ops.calls == []


def test_wrong_or_missing_token_is_401_and_counted(ops):
    ops.stack.auth.set_token(TOKEN)
    wrong0, missing0 = _failures(ops, "wrong"), _failures(ops, "missing")
    r = _post(ops, "/admin/poke", token=TOKEN + "x")
    assert r.status_code == 401 and "not the admin token" in r.json()["error"]
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert _post(ops, "/admin/poke").status_code == 401
    assert ops.get("/status", params={"log_tail": 3}).status_code == 401
    assert _failures(ops, "wrong") == wrong0 + 1
    assert _failures(ops, "missing") == missing0 + 2
    assert ops.calls == []
    metrics = ops.get("/metrics").text
    assert 'sentinel_admin_auth_failures_total{reason="wrong"}' in metrics


def test_right_token_runs_the_handler_and_unlocks_the_log_tail(ops):
    ops.stack.auth.set_token(TOKEN)
    r = _post(ops, "/admin/poke", token=TOKEN)
    assert r.status_code == 200 and r.json() == {"poked": True}
    assert ops.calls == ["POST"]
    doc = ops.get("/status", params={"log_tail": 3}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert doc.status_code == 200 and len(doc.json()["log_tail"]) == 2
    # wrong method and unknown endpoint: clear answers, after the token check
    get = ops.get("/admin/poke", headers={"Authorization": f"Bearer {TOKEN}"})
    assert get.status_code == 405 and "POST" in get.json()["error"]
    unknown = _post(ops, "/admin/nope", token=TOKEN)
    assert unknown.status_code == 404 and "/admin/poke" in unknown.json()["error"]
    assert _post(ops, "/admin/nope").status_code == 401


def test_probes_metrics_and_summary_status_stay_open(ops):
    ops.stack.auth.set_token(TOKEN)
    for path in ("/livez", "/readyz", "/startupz", "/metrics"):
        assert ops.get(path).status_code in (200, 503), path
    doc = ops.get("/status")
    assert doc.status_code == 200 and "state" in doc.json() and "log_tail" not in doc.json()
    assert "/admin/poke" in ops.get("/").json()["endpoints"]


def test_token_sources(tmp_path, monkeypatch):
    assert read_token(None, None) is None
    f = tmp_path / "tok"
    f.write_text(TOKEN + "\n")
    assert read_token(f, None) == TOKEN
    monkeypatch.setenv("MY_ADMIN_TOKEN", TOKEN)
    assert read_token(None, "MY_ADMIN_TOKEN") == TOKEN
    with pytest.raises(AdminTokenError, match="token_file .* does not exist"):
        read_token(tmp_path / "missing", None)
    monkeypatch.delenv("MY_ADMIN_TOKEN")
    with pytest.raises(AdminTokenError, match="'MY_ADMIN_TOKEN', which is not set"):
        read_token(None, "MY_ADMIN_TOKEN")
    (tmp_path / "short").write_text("abc")
    with pytest.raises(AdminTokenError, match="at least 16"):
        read_token(tmp_path / "short", None)
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(AdminTokenError, match="is empty"):
        read_token(tmp_path / "empty", None)
    with pytest.raises(AdminTokenError, match="is a directory|cannot be read"):
        read_token(tmp_path, None)


def test_a_token_with_a_line_break_inside_is_refused_naming_its_source(tmp_path, monkeypatch):
    """A token that cannot go into a header (CR/LF inside, controls, non-ASCII) could never
    be sent: refused at start, naming the key, never showing the value."""
    f = tmp_path / "tok"
    for bad in ("abcdefghij012345\nsecond-line-xyz", "abcdefghij\r012345678", "abcdéfghij0123456"):
        f.write_text(bad + "\n")
        with pytest.raises(AdminTokenError, match="ops.admin.token_file") as err:
            read_token(f, None)
        assert "one line of printable ASCII" in str(err.value)
        assert "second-line" not in str(err.value) and "abcdefghij" not in str(err.value)
    monkeypatch.setenv("MY_ADMIN_TOKEN", "abcdefghij012345\nsecond-line-xyz")
    with pytest.raises(AdminTokenError, match="MY_ADMIN_TOKEN.*line break"):
        read_token(None, "MY_ADMIN_TOKEN")


def test_only_one_token_source(tmp_path):
    from sentinel.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="only one of token_file and token_env"):
        load_config(None, sets=[f"ops.admin.token_file={tmp_path}/t", "ops.admin.token_env=X"])


def test_a_malformed_or_deeply_nested_admin_body_is_a_clear_400(ops):
    from sentinel.watchdogs.admin import _body

    async def echo(request: Request) -> Response:
        body = await _body(request)
        return body if isinstance(body, Response) else JSONResponse({"got": body})

    ops.stack.admin.add("/admin/echo", echo, methods=["POST"])
    ops.stack.auth.set_token(TOKEN)
    assert _post(ops, "/admin/echo", token=TOKEN, content=b'{"a": 1}').json() == {"got": {"a": 1}}
    for body, said in (
        (b"[" * 3000, "nested too deeply"),
        (b'{"a":[' * 600, "nested too deeply"),
        (b"{not json", "not JSON"),
        (b"[1]", "JSON object"),
    ):
        r = _post(ops, "/admin/echo", token=TOKEN, content=body)
        assert r.status_code == 400 and said in r.json()["error"], (body[:10], r.text[:200])


def test_last_exit_log_lines_need_the_token_too(ops):
    import time

    from sentinel.state import ExitInfo

    lines = ["ERROR user prompt was: 'my SSN is 123-45-6789'", "RuntimeError: CUDA error"]
    info = ExitInfo(1, 7, 1, None, time.time(), "the engine crashed", "crashed", lines)
    ops.call(lambda: ops.status.record_exit(info))
    ops.stack.auth.set_token(TOKEN)
    wrong0 = _failures(ops, "wrong")
    opened = ops.get("/status")
    assert opened.status_code == 200 and "SSN" not in opened.text
    last = opened.json()["last_exit"]
    assert last["reason"] == "crashed" and "log_tail" not in last
    assert "2 engine log lines" in last["log_tail_hidden"] and "token" in last["log_tail_hidden"]
    authed = ops.get("/status", headers={"Authorization": f"Bearer {TOKEN}"})
    assert authed.json()["last_exit"]["log_tail"] == lines
    wrong = ops.get("/status", headers={"Authorization": f"Bearer {TOKEN}x"})
    assert wrong.status_code == 401 and "SSN" not in wrong.text
    assert _failures(ops, "wrong") == wrong0 + 1
    ops.stack.auth.set_token(None)  # admin API off: the lines stay hidden, the status open
    off = ops.get("/status", headers={"Authorization": f"Bearer {TOKEN}"})
    assert off.status_code == 200 and "log_tail" not in off.json()["last_exit"]


def test_a_collector_that_raises_loses_only_its_own_series(ops):
    class Broken:
        def describe(self):
            return []

        def collect(self):
            raise RuntimeError("NVML: GPU is lost")

    def errors(name):
        return ops.registry.get_sample_value(
            "sentinel_metrics_collector_errors_total", {"collector": name}
        )

    assert errors("EngineStatusCollector") == 0  # every guarded collector starts at 0
    broken = Broken()
    ops.registry.register(broken)
    try:
        for _ in range(2):
            r = ops.get("/metrics")
            assert r.status_code == 200 and "sentinel_admin_auth_failures_total" in r.text
            assert "sentinel_engine_restarts_total" in r.text  # another custom collector
        assert errors("Broken") >= 2
        assert 'sentinel_metrics_collector_errors_total{collector="Broken"}' in r.text
    finally:
        ops.registry.unregister(broken)


def test_a_failing_collector_is_logged_at_most_once_a_minute(capsys):
    from prometheus_client import generate_latest

    from sentinel.ops.metrics import SentinelRegistry

    now = [1000.0]
    registry = SentinelRegistry(clock=lambda: now[0])

    class Flaky:
        def describe(self):
            return []

        def collect(self):
            raise ValueError("boom")

    registry.register(Flaky())
    for t in (1000.0, 1010.0, 1059.0, 1061.0):
        now[0] = t
        assert b"sentinel_metrics_collector_errors_total" in generate_latest(registry)
    errors = registry.get_sample_value(
        "sentinel_metrics_collector_errors_total", {"collector": "Flaky"}
    )
    assert errors == 4  # one per scrape (the counter is read before Flaky runs again)
    assert capsys.readouterr().out.count("a metrics collector failed") == 2


def test_a_flood_of_wrong_tokens_is_counted_but_logged_once_a_minute(ops, capsys):
    """Refusals are a client's to cause: each is counted, but only the first per reason per
    minute is logged, so a flood cannot push earlier lines out of the log ring."""
    import httpx

    ops.stack.auth.set_token(TOKEN)
    capsys.readouterr()
    wrong0 = _failures(ops, "wrong")
    with httpx.Client(timeout=5, trust_env=False) as c:
        for i in range(300):
            r = c.post(ops.url + "/admin/poke", headers={"Authorization": f"Bearer nope{i}"})
            assert r.status_code == 401
    assert _failures(ops, "wrong") == wrong0 + 300
    assert capsys.readouterr().out.count("admin request refused") <= 1


def test_refusal_lines_after_a_quiet_minute_say_how_many_were_left_out(capsys):
    from prometheus_client import CollectorRegistry

    from sentinel.logs import LogThrottle
    from sentinel.ops.admin import AdminAuth

    now = [0.0]
    registry = CollectorRegistry()
    auth = AdminAuth(registry, TOKEN, throttle=LogThrottle(60, lambda: now[0]))

    def refuse(token: str) -> None:
        scope = {
            "type": "http",
            "method": "POST",
            "path": "/admin/poke",
            "headers": [(b"authorization", f"Bearer {token}".encode())],
            "client": ("10.0.0.9", 1234),
        }
        assert auth.check(Request(scope)).status_code == 401

    for t in (0, 1, 2, 59, 61, 62):
        now[0] = t
        refuse("wrong-token-0123456789")
    out = capsys.readouterr().out
    assert out.count("admin request refused") == 2
    last = out.strip().splitlines()[-1]
    assert "suppressed=3" in last or '"suppressed": 3' in last  # left out from 0 s to 61 s
    total = registry.get_sample_value("sentinel_admin_auth_failures_total", {"reason": "wrong"})
    assert total == 6
