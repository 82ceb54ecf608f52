"""The floor under the proxy's tail figures: Sentinel's proxy against the leanest relay
Python can make, on the same machine in the same minutes.

    .venv/bin/python -m bench.relay_floor [--scenario stream|rate|both] [--rounds 2]

``bytepipe`` parses requests and responses with httptools (to find message ends) on
uvloop and forwards the upstream's bytes to the client the moment they arrive: no
chain, no metrics, no payload log, no checks. The relays (bytepipe and Sentinel) are
pinned to core 0, the upstream and load generator to core 1 (as in ``bench.proxy``).
Scenarios, each in 5 rounds per pass, every round running each relay in turn after a direct run:

- ``stream``: the steady-state streaming scenario of ``bench.proxy`` (64 streams, 32
  events 20 ms apart, starts 10 ms apart); judged: added time to first token p99;
- ``rate``: 1 500 req/s of whole answers over 64 connections, 2 s a round; judged:
  added latency p99.

Printed per relay: added p50 (median of rounds), p99 by round with their median, the
share of each round stolen from the relays' core by the hypervisor, the rounds in
which no core lost any time, and the relay's CPU time (user + system) per request.
Sentinel runs here with its payload log off, as the byte pipe has none. What the
floor cannot reach on a machine, no proxy written on this stack reaches there.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
from typing import Any

from bench import proxy as bp


def run_bytepipe(port: int, upstream_port: int) -> None:
    import httptools

    idle: list[_Up] = []

    class _Up(asyncio.Protocol):
        def __init__(self) -> None:
            self.client: _Client | None = None
            self.parser = httptools.HttpResponseParser(self)
            self.transport: asyncio.Transport | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport  # type: ignore[assignment]

        def data_received(self, data: bytes) -> None:
            if self.client is not None and self.client.transport is not None:
                self.client.transport.write(data)
            self.parser.feed_data(data)

        def on_message_complete(self) -> None:
            self.client = None
            idle.append(self)

    class _Client(asyncio.Protocol):
        def __init__(self) -> None:
            self.parser = httptools.HttpRequestParser(self)
            self.buf: list[bytes] = []
            self.transport: asyncio.Transport | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport  # type: ignore[assignment]

        def data_received(self, data: bytes) -> None:
            self.buf.append(data)
            self.parser.feed_data(data)

        def on_message_complete(self) -> None:
            raw, self.buf = b"".join(self.buf), []
            if idle:
                up = idle.pop()
                up.client = self
                assert up.transport is not None
                up.transport.write(raw)
            else:
                asyncio.get_running_loop().create_task(self._connect(raw))

        async def _connect(self, raw: bytes) -> None:
            loop = asyncio.get_running_loop()
            _, up = await loop.create_connection(_Up, "127.0.0.1", upstream_port)
            up.client = self
            assert up.transport is not None
            up.transport.write(raw)

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(_Client, "127.0.0.1", port)
        print("ready", flush=True)
        await server.serve_forever()

    bp.new_loop().run_until_complete(main())


SCENARIOS = {
    # name: (load keywords, the sample whose added p99 is judged, the goal in seconds)
    "stream": (
        {
            "requests": 1920 // bp.ROUNDS,
            "duration": None,
            "body": {"model": "bench", "prompt": "hi", "max_tokens": 32, "stream": True},
            "stagger": 32 * 0.02 / 64,
        },
        "ttft",
        0.001,
    ),
    "rate": (
        {
            "requests": None,
            "duration": 10.0 / bp.ROUNDS,
            "body": {"model": "bench", "prompt": "hi", "max_tokens": 2},
            "rate": 1500,
        },
        "lat",
        0.005,
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--role", choices=["bench", "bytepipe"], default="bench")
    ap.add_argument("--port", type=int)
    ap.add_argument("--upstream-port", type=int)
    ap.add_argument("--rounds", type=int, default=2, help="passes over the relays")
    ap.add_argument(
        "--scenario",
        choices=[*SCENARIOS, "both"],
        default="stream",
        help="stream: 64 streams, added TTFT p99; rate: 1500 req/s, added latency p99",
    )
    a = ap.parse_args()
    if a.role == "bytepipe":
        bp.pin([0])
        run_bytepipe(a.port, a.upstream_port)
        return
    procs: list[subprocess.Popen[str]] = []
    try:
        up = bp.free_port()
        procs.append(bp._spawn(["--role", "upstream", "--port", str(up)], [1]))
        pipe = bp.free_port()
        cmd = [sys.executable, "-m", "bench.relay_floor", "--role", "bytepipe"]
        p = subprocess.Popen(
            [*cmd, "--port", str(pipe), "--upstream-port", str(up)],
            cwd=bp.ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(p)
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        relays = [("bytepipe", pipe, p.pid)]
        port = bp.free_port()
        args = ["--role", "proxy", "--port", str(port), "--payload-dir", "off"]
        args += ["--upstream", f"http://127.0.0.1:{up}"]
        procs.append(bp._spawn(args, [0]))
        relays.append(("sentinel", port, procs[-1].pid))
        bp.pin([1])
        scenarios = list(SCENARIOS) if a.scenario == "both" else [a.scenario]
        bp.new_loop().run_until_complete(_passes(up, relays, scenarios, a.rounds))
    finally:
        for proc in procs:
            bp._stop(proc)


async def _passes(
    up: int, relays: list[tuple[str, int, int]], scenarios: list[str], n: int
) -> None:
    """Each round runs every relay in turn (a direct run, then the relay's), so that the
    relays meet the same spells of the machine; per relay, the added p99 of each round
    and their median, each round's stolen CPU time, the rounds without any, and the
    relay's CPU time (user + system) per request."""
    for name in scenarios:
        kw, key, goal = SCENARIOS[name]
        for _ in range(n):
            rounds: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {
                r: [] for r, _, _ in relays
            }
            cpu = {r: 0.0 for r, _, _ in relays}
            for _ in range(bp.ROUNDS):
                for relay, port, pid in relays:
                    direct = await bp._load(up, 64, **kw)
                    cpu0 = bp._tree_cpu_s(pid)
                    relayed = await bp._load(port, 64, **kw)
                    cpu[relay] += bp._tree_cpu_s(pid) - cpu0
                    rounds[relay].append((direct, relayed))
            print(f"[{name}: added {key} p99, goal <= {goal * 1e3:g} ms]", flush=True)
            for relay, _, _ in relays:
                rs = rounds[relay]
                per_req = cpu[relay] / sum(pr["n"] for _, pr in rs)
                added = [bp.pct(pr[key], 99) - bp.pct(dr[key], 99) for dr, pr in rs]
                a50 = statistics.median(bp.pct(pr[key], 50) - bp.pct(dr[key], 50) for dr, pr in rs)
                if key == "ttft":
                    same = sum(sum(pr["events"]) for _, pr in rs) == sum(
                        sum(dr["events"]) for dr, _ in rs
                    )
                    check = f"events out == in: {same}"
                else:
                    check = f"errors {sum(pr['errors'] for _, pr in rs)}"
                print(
                    f"  {relay:9s} {check}; added p50 {bp.ms(a50)}; "
                    f"p99 by round {bp._rounds_text(added)}: median "
                    f"{bp.ms(statistics.median(added))}; steal (proxy core) "
                    f"{bp._steal_text(rs)}; {bp._quiet_text(added, rs)}; CPU per request "
                    f"{per_req * 1e6:.0f} us",
                    flush=True,
                )


if __name__ == "__main__":
    main()
