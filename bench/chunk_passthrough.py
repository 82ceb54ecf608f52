"""What stream pass-through would save per event, in user-space instructions (callgrind):
the piped path of today for one upstream read holding one SSE event (llhttp's
``on_body`` callback, the part queued and handed on, re-framed, written) against the
pass-through path (``ChunkScanner.feed`` over the raw read, written as it came), and
llhttp fed the raw read with no ``on_body`` callback, the read written as it came (the
framing tracked in C: the floor of pass-through on httptools' public API).

    .venv/bin/python -m bench.chunk_passthrough

Only the per-read work of the two paths is measured (both write to a transport that
drops the bytes); the rest of a stream's cost (request, head, records) is the same.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

N = 20000
EVENT = b'data: {"id":"cmpl-1","object":"text_completion","choices":[{"text":" hi"}]}\n\n'


class _Sink:
    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0

    def write(self, data: bytes) -> None:
        self.n += len(data)

    def is_closing(self) -> bool:
        return False


def run(kind: str, n: int) -> None:
    import httptools

    from sentinel.proxy.chunkscan import ChunkScanner

    frame = b"%x\r\n%b\r\n" % (len(EVENT), EVENT)
    t = _Sink()
    head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    if kind == "llhttp":

        class Proto:  # the shape of UpstreamConnection + RawResponse.push + write_part
            def __init__(self) -> None:
                self.parts: list[bytes] = []
                self.parser = httptools.HttpResponseParser(self)

            def on_body(self, body: bytes) -> None:
                self.parts.append(body)

            def data_received(self, data: bytes) -> None:
                self.parser.feed_data(data)
                parts = self.parts
                if parts:
                    part = parts[0] if len(parts) == 1 else b"".join(parts)
                    parts.clear()
                    if not t.is_closing():
                        t.write(b"%x\r\n%b\r\n" % (len(part), part))

        p = Proto()
        p.data_received(head)
        for _ in range(n):
            p.data_received(frame)
    elif kind == "llhttp-nobody":  # llhttp tracks the framing, no body callback: raw out

        class Bare:
            def __init__(self) -> None:
                self.parser = httptools.HttpResponseParser(self)

            def data_received(self, data: bytes) -> None:
                self.parser.feed_data(data)
                if not t.is_closing():
                    t.write(data)

        b = Bare()
        b.data_received(head)
        for _ in range(n):
            b.data_received(frame)
    else:
        sc = ChunkScanner()
        for _ in range(n):
            out = sc.feed(frame)
            if not t.is_closing():
                t.write(out)


def _instructions(kind: str, n: int) -> int:
    out = Path(tempfile.mkdtemp(prefix="sentinel-cg-")) / "cg"
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    code = f"import bench.chunk_passthrough as b; b.run({kind!r}, {n})"
    subprocess.run([*cmd, sys.executable, "-c", code], check=True, capture_output=True)
    for line in out.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError("no totals")


def main() -> None:
    got = {}
    for kind in ("llhttp", "scanner", "llhttp-nobody"):
        # the difference of two runs: interpreter start and imports cancel out
        got[kind] = (_instructions(kind, N) - _instructions(kind, 0)) / N
        print(f"{kind:14s}: {got[kind]:7,.0f} instructions per event read", flush=True)
    for kind in ("scanner", "llhttp-nobody"):
        print(f"{kind} / llhttp path (today's): {got[kind] / got['llhttp']:.2f}")


if __name__ == "__main__":
    main()
