"""Preemption notices (issue 16): a notice file, and a cloud metadata endpoint faked on
loopback the way AWS, GCP and Azure answer."""

from __future__ import annotations

import asyncio
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sentinel.config import ConfigError, load_config
from sentinel.config.schema import PreemptionConfig
from sentinel.lifecycle.preempt import PreemptionWatcher


class Metadata:
    """A fake metadata server: answers ``answer`` = (status, body) and keeps headers."""

    def __init__(self) -> None:
        self.answer: tuple[int, str] = (404, "not found")
        self.headers: list[dict[str, str]] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                outer.headers.append(dict(self.headers))
                status, body = outer.answer
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/latest/meta-data/spot/instance-action"

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def meta() -> Any:
    m = Metadata()
    yield m
    m.close()


def _watch(cfg: PreemptionConfig, change: Any, after_s: float = 0.3) -> list[str]:
    notices: list[str] = []

    async def main() -> None:
        w = PreemptionWatcher(cfg, notices.append)
        task = asyncio.create_task(w.run())
        await asyncio.sleep(after_s)
        assert notices == []  # nothing before the notice
        change()
        await asyncio.wait_for(task, 5)

    asyncio.run(main())
    return notices


def test_notice_file(tmp_path: Path) -> None:
    f = tmp_path / "preempt"
    notices = _watch(PreemptionConfig(file=f, poll_interval_s=0.05), lambda: f.write_text("x"))
    assert len(notices) == 1 and str(f) in notices[0]


def test_aws_style_404_until_scheduled(meta: Metadata) -> None:
    cfg = PreemptionConfig(url=meta.url, match="action", poll_interval_s=0.05)

    def schedule() -> None:
        meta.answer = (200, '{"action": "terminate", "time": "2026-12-04T23:59:00Z"}')

    notices = _watch(cfg, schedule)
    assert len(notices) == 1 and "terminate" in notices[0]


def test_gcp_style_false_then_true_with_header(meta: Metadata) -> None:
    meta.answer = (200, "FALSE")
    cfg = PreemptionConfig(
        url=meta.url, headers={"Metadata-Flavor": "Google"}, match="TRUE", poll_interval_s=0.05
    )
    notices = _watch(cfg, lambda: setattr(meta, "answer", (200, "TRUE")))
    assert len(notices) == 1
    assert meta.headers[0]["Metadata-Flavor"] == "Google"


def test_azure_style_scheduled_events(meta: Metadata) -> None:
    meta.answer = (200, '{"DocumentIncarnation": 1, "Events": []}')
    cfg = PreemptionConfig(
        url=meta.url, headers={"Metadata": "true"}, match="Preempt", poll_interval_s=0.05
    )
    preempt = '{"Events": [{"EventType": "Preempt", "NotBefore": "Fri, 04 Dec 2026 23:59:00 GMT"}]}'
    notices = _watch(cfg, lambda: setattr(meta, "answer", (200, preempt)))
    assert len(notices) == 1 and "Preempt" in notices[0]


def test_unreachable_url_is_no_notice() -> None:
    notices: list[str] = []

    async def main() -> None:
        w = PreemptionWatcher(
            PreemptionConfig(url="http://127.0.0.1:9/x", poll_interval_s=0.05, timeout_s=0.2),
            notices.append,
        )
        task = asyncio.create_task(w.run())
        await asyncio.sleep(0.4)
        task.cancel()

    asyncio.run(main())
    assert notices == []


def test_bad_preemption_config_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="url must start with http"):
        load_config(None, sets=["lifecycle.preemption.url=169.254.169.254/x"])
    with pytest.raises(ConfigError, match="match is not a valid regular expression"):
        load_config(None, sets=["lifecycle.preemption.match=(unclosed"])
