"""The ops port under hostile clients (``ops.limits``): an endless header, slowloris
connections, too many connections from one address, a header that never ends in time.
The kubelet's /livez and Prometheus's /metrics keep answering throughout.

Loopback clients can come from any 127.x.y.z address: the hostile ones here connect
from addresses of their own (127.0.0.2 ...), as another host would, while the probes
come from 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import flood_header, free_port, wait_for
from tests.unit.ops_thread import OpsThread


@pytest.fixture(scope="module")
def ops() -> Iterator[OpsThread]:
    """The ops port with its default limits (probes off: no engine is needed here)."""
    with OpsThread({}, f"http://127.0.0.1:{free_port()}", run_probes=False) as o:
        yield o


def metric(o: OpsThread, name: str, **labels: str) -> float:
    text = o.get("/metrics").text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def connect(o: OpsThread, source: str = "127.0.0.1") -> socket.socket:
    s = socket.socket()
    s.bind((source, 0))
    s.connect(("127.0.0.1", o.stack.server.port))
    return s


def closed_by_server(s: socket.socket, timeout: float = 2.0) -> bytes | None:
    """What the server sent before it closed ``s`` (None: still open after ``timeout``)."""
    s.settimeout(timeout)
    got = b""
    try:
        while chunk := s.recv(65536):
            got += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        return None
    return got


class Poller:
    """GETs ``paths`` from 127.0.0.1 in a loop, each with the kubelet's default probe
    timeout (1 s), recording the statuses (0: no answer in time)."""

    def __init__(self, o: OpsThread, paths: tuple[str, ...]) -> None:
        self.o = o
        self.paths = paths
        self.statuses: dict[str, list[int]] = {p: [] for p in paths}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for p in self.paths:
                try:
                    code = httpx.get(self.o.url + p, timeout=1, trust_env=False).status_code
                except httpx.HTTPError:
                    code = 0
                self.statuses[p].append(code)
            time.sleep(0.02)

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def check(self, at_least: int = 3) -> None:
        for p, got in self.statuses.items():
            assert len(got) >= at_least and set(got) == {200}, (p, got)


def test_an_endless_header_gets_431_naming_the_ops_key_while_livez_answers(
    ops: OpsThread,
) -> None:
    before = metric(ops, "sentinel_ops_requests_refused_total", reason="header_too_large")
    with Poller(ops, ("/livez",)) as poller:
        s = connect(ops, "127.0.0.2")
        s.sendall(b"GET /livez HTTP/1.1\r\nhost: x\r\nx-junk: ")
        got, sent, _ = flood_header(s, timeout=10)
        rest = closed_by_server(s, 5) or b""
        s.close()
        time.sleep(0.2)
    assert got.startswith(b"HTTP/1.1 431"), got[:200]
    assert sent < 16 * 1024 * 1024, f"{sent} bytes were sent before the 431 came back"
    assert b"ops.limits.max_header_bytes" in got + rest
    poller.check()
    after = metric(ops, "sentinel_ops_requests_refused_total", reason="header_too_large")
    assert after == before + 1


def test_200_slowloris_connections_leave_livez_and_metrics_answering(ops: OpsThread) -> None:
    conns: list[socket.socket] = []
    try:
        for i in range(200):  # 20 from each of 10 addresses (under the per-client cap)
            c = connect(ops, f"127.0.0.{10 + i % 10}")
            c.sendall(b"GET /livez HTTP/1.1\r\nhost: x\r\nx-slow-%d: " % i)
            conns.append(c)
        with Poller(ops, ("/livez", "/metrics")) as poller:
            for c in conns:  # still trickling
                c.sendall(b"a")
            time.sleep(1.0)
        poller.check()
        # none of them was refused: all 200 were held open while the probes answered
        for c in conns:
            c.setblocking(False)
            with pytest.raises(BlockingIOError):
                c.recv(1)
    finally:
        for c in conns:
            c.close()


def test_connections_beyond_the_per_client_cap_are_closed_and_counted(
    ops: OpsThread,
) -> None:
    cap = ops.cfg.ops.limits.max_connections_per_client
    before = metric(
        ops, "sentinel_ops_connections_refused_total", reason="max_connections_per_client"
    )
    held = [connect(ops, "127.0.0.3") for _ in range(cap)]
    try:
        for c in held:  # each accepted (it answers), then kept open
            c.sendall(b"GET /livez HTTP/1.1\r\nhost: x\r\n\r\n")
            c.settimeout(5)
            assert c.recv(65536).startswith(b"HTTP/1.1 200")
        extra = [connect(ops, "127.0.0.3") for _ in range(3)]
        for c in extra:
            assert closed_by_server(c) == b""  # closed at once, nothing said
            c.close()
        # another address (the kubelet's) is not affected
        assert ops.get("/livez").status_code == 200
        after = metric(
            ops, "sentinel_ops_connections_refused_total", reason="max_connections_per_client"
        )
        assert after == before + 3
        # one closed: that address may open one again
        held.pop().close()

        def reopened() -> bool:
            c = connect(ops, "127.0.0.3")
            c.sendall(b"GET /livez HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            got = closed_by_server(c)
            c.close()
            return bool(got and got.startswith(b"HTTP/1.1 200"))

        wait_for(reopened, 5, what="a connection from 127.0.0.3 once one closed")
    finally:
        for c in held:
            c.close()


def test_a_header_not_received_in_time_gets_408_naming_the_ops_key() -> None:
    cfg = {"ops": {"limits": {"header_timeout_s": 0.5}}}
    with OpsThread(cfg, f"http://127.0.0.1:{free_port()}", run_probes=False) as o:
        s = connect(o, "127.0.0.2")
        s.sendall(b"GET /livez HTTP/1.1\r\nhost: x\r\nx-slow: a")
        got = closed_by_server(s, 5)
        s.close()
        assert got is not None and got.startswith(b"HTTP/1.1 408"), got
        assert b"ops.limits.header_timeout_s" in got
        assert metric(o, "sentinel_ops_requests_refused_total", reason="header_timeout") == 1
        assert o.get("/livez").status_code == 200


def test_a_stop_lets_a_request_in_flight_end_and_takes_no_new_connection() -> None:
    """``request_stop``: the listening socket closes at once; a request in flight gets
    ``STOP_GRACE_S`` to end."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from sentinel.ops.server import OpsServer
    from tests.loop_thread import LoopThread

    async def slow(_: object) -> PlainTextResponse:
        await asyncio.sleep(0.3)
        return PlainTextResponse("done")

    server = OpsServer(Starlette(routes=[Route("/slow", slow)]), "127.0.0.1", 0)
    server.bind()
    url = server.url
    thread = LoopThread("ops-stop")
    served: list[asyncio.Task[None]] = []

    async def start() -> None:
        served.append(asyncio.get_running_loop().create_task(server.serve()))

    thread.start(start)
    try:
        got: list[httpx.Response] = []
        t = threading.Thread(
            target=lambda: got.append(httpx.get(url + "/slow", timeout=5, trust_env=False))
        )
        t.start()
        time.sleep(0.1)  # the request is in flight
        thread.call(server.request_stop)
        t.join(5)
        assert got and got[0].status_code == 200 and got[0].text == "done"
        wait_for(lambda: served[0].done(), 5, what="serve() to return")
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/slow", timeout=2, trust_env=False)
    finally:
        thread.stop()
