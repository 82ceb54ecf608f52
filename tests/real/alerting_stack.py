"""A real Prometheus and Alertmanager (Debian's packages) on free loopback ports, for the
end-to-end alerting test: Prometheus scrapes given targets with a rule file, Alertmanager
sends every alert to a webhook receiver that keeps what it gets.

Data directories live under the given tmp dir; ``stop()`` ends only the two servers
started here (by their Popen handles).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.helpers import free_port, wait_for

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
ALERTMANAGER = shutil.which("prometheus-alertmanager") or "/usr/bin/prometheus-alertmanager"


def available() -> bool:
    return Path(PROMETHEUS).exists() and Path(ALERTMANAGER).exists()


class Webhook:
    """Alertmanager's webhook receiver: every notification's JSON body in ``received``."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                n = int(self.headers.get("content-length") or 0)
                hook.received.append(json.loads(self.rfile.read(n)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def alerts(self, name: str, status: str) -> list[dict[str, Any]]:
        return [
            a
            for n in list(self.received)
            for a in n["alerts"]
            if a["labels"].get("alertname") == name and a["status"] == status
        ]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class AlertingStack:
    def __init__(
        self, tmp: Path, targets: list[str], rules: dict[str, Any], interval_s: float = 2.0
    ) -> None:
        self.tmp = tmp
        self.webhook = Webhook()
        self.prom_port = free_port()
        self.am_port = free_port()
        self.procs: list[subprocess.Popen[bytes]] = []
        every = f"{interval_s:g}s"
        (tmp / "rules.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
        (tmp / "prometheus.yml").write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": every, "evaluation_interval": every},
                    "rule_files": [str(tmp / "rules.yml")],
                    "alerting": {
                        "alertmanagers": [
                            {"static_configs": [{"targets": [f"127.0.0.1:{self.am_port}"]}]}
                        ]
                    },
                    "scrape_configs": [
                        {"job_name": "sentinel", "static_configs": [{"targets": targets}]}
                    ],
                }
            )
        )
        (tmp / "alertmanager.yml").write_text(
            yaml.safe_dump(
                {
                    "route": {
                        "receiver": "hook",
                        "group_by": ["alertname", "instance"],
                        "group_wait": "1s",
                        "group_interval": "1s",
                        "repeat_interval": "1h",
                    },
                    "receivers": [
                        {
                            "name": "hook",
                            "webhook_configs": [{"url": self.webhook.url, "send_resolved": True}],
                        }
                    ],
                }
            )
        )

    @property
    def prom_url(self) -> str:
        return f"http://127.0.0.1:{self.prom_port}"

    def start(self) -> AlertingStack:
        self._spawn(
            "alertmanager",
            [
                ALERTMANAGER,
                f"--config.file={self.tmp / 'alertmanager.yml'}",
                f"--storage.path={self.tmp / 'am-data'}",
                f"--web.listen-address=127.0.0.1:{self.am_port}",
                "--cluster.listen-address=",
            ],
        )
        self._spawn(
            "prometheus",
            [
                PROMETHEUS,
                f"--config.file={self.tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.tmp / 'prom-data'}",
                f"--web.listen-address=127.0.0.1:{self.prom_port}",
            ],
        )
        wait_for(self._ready, 60, interval=0.5, what="Prometheus and Alertmanager ready")
        return self

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))

    def _ready(self) -> bool:
        for p in self.procs:
            if p.poll() is not None:
                raise AssertionError(f"{p.args[0]} exited {p.returncode}: {self.logs()}")
        try:
            return all(
                httpx.get(f"http://127.0.0.1:{port}/-/ready", timeout=2).status_code == 200
                for port in (self.prom_port, self.am_port)
            )
        except httpx.HTTPError:
            return False

    def logs(self) -> str:
        return "\n".join(
            (self.tmp / f"{n}.log").read_text(errors="replace")[-3000:]
            for n in ("prometheus", "alertmanager")
            if (self.tmp / f"{n}.log").exists()
        )

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.webhook.stop()

    # ---- queries -------------------------------------------------------------------
    def query(self, expr: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.prom_url}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert body.get("status") == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def alerts(self, name: str, state: str = "firing") -> list[dict[str, Any]]:
        r = httpx.get(f"{self.prom_url}/api/v1/alerts", timeout=10).json()
        return [
            a
            for a in r["data"]["alerts"]
            if a["labels"]["alertname"] == name and a["state"] == state
        ]
