"""The floor under the proxy's streaming figures: Sentinel's proxy against the leanest
relay Python can make, on the same machine in the same minutes.

    .venv/bin/python -m bench.relay_floor [--rounds 2]

``bytepipe`` parses requests and responses with httptools (to find message ends) on
uvloop and forwards the upstream's bytes to the client the moment they arrive: no
ASGI, no chain, no metrics, no payload log, no checks. The relays (bytepipe,
Sentinel, and Sentinel with its fast path off: ``no-fast``) are pinned to core 0, the
upstream and load generator to core 1 (as in ``bench.proxy``), and each takes
the steady-state streaming scenario of ``bench.proxy`` (64 streams, 32 events 20 ms
apart, starts 10 ms apart) alternated with a direct connection. Printed: added time
to first token p50, and p99 by round with their median. What the floor cannot reach
on a machine, no proxy written on this stack reaches there.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--role", choices=["bench", "bytepipe"], default="bench")
    ap.add_argument("--port", type=int)
    ap.add_argument("--upstream-port", type=int)
    ap.add_argument("--rounds", type=int, default=2, help="passes over both relays")
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
        relays = [("bytepipe", pipe)]
        for name, fast in (("sentinel", "on"), ("no-fast", "off")):
            port = bp.free_port()
            args = ["--role", "proxy", "--port", str(port), "--payload-dir", "off"]
            args += ["--fast-path", fast, "--upstream", f"http://127.0.0.1:{up}"]
            procs.append(bp._spawn(args, [0]))
            relays.append((name, port))
        bp.pin([1])
        body = {"model": "bench", "prompt": "hi", "max_tokens": 32, "stream": True}

        async def go() -> None:
            for _ in range(a.rounds):
                for name, port in relays:
                    d, p, rounds = await bp._paired(
                        up, port, 64, 1920, None, body, stagger=32 * 0.02 / 64
                    )
                    r99, a99 = bp.added_by_round(rounds, "ttft", 99)
                    a50 = bp.pct(p["ttft"], 50) - bp.pct(d["ttft"], 50)
                    same = sum(p["events"]) == sum(d["events"])
                    print(
                        f"{name:9s} events out == in: {same}; added ttft p50 {bp.ms(a50)}, "
                        f"p99 by round {bp._rounds_text(r99)}: median {bp.ms(a99)}; "
                        f"steal {bp._steal_text(rounds)}",
                        flush=True,
                    )

        bp.new_loop().run_until_complete(go())
    finally:
        for proc in procs:
            bp._stop(proc)


if __name__ == "__main__":
    main()
