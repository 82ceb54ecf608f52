"""An incremental scanner of a chunked HTTP/1.1 body (``ChunkScanner``), for passing an
upstream's chunked stream through to a chunked client without parsing each event.

Not used by the relay: measured (``bench.chunk_passthrough``), scanning the framing in
Python costs more instructions per event than llhttp's parse plus its ``on_body``
callback, so passing streams through with it would make them dearer, not cheaper; see
``docs/design/proxy.md``, "Stream pass-through (measured, not adopted)". Kept, with its
tests, as the measured candidate.

``feed`` takes what one network read brought and returns the bytes to write to the
client, always ending on a chunk boundary (so an SSE error event and the last-chunk
can follow at any time):

- whole chunks that arrived in this read are returned as they came (the upstream's own
  framing and chunk extensions; no copy when the read holds only whole chunks);
- a chunk split across reads is re-framed: the part of its data that has arrived
  leaves now as a chunk of its own (the client gets every byte at once, and the
  output still ends on a boundary);
- the upstream's last-chunk and trailers are consumed, not returned (the relay writes
  its own last-chunk); ``done`` is then True and ``rest`` holds any bytes after the
  message (bytes nobody asked for).

A malformed chunk size, a missing CRLF after chunk data, or a size line or trailer
section over its bound raises ``ChunkError`` (an upstream failure); nothing else is
raised.
"""

from __future__ import annotations

MAX_LINE = 4096  # a chunk-size line (with extensions) or one trailer line
MAX_TRAILERS = 16 * 1024  # the whole trailer section
_HEX = frozenset(b"0123456789abcdefABCDEF")

_SIZE, _DATA, _CRLF, _TRAILER, _DONE = range(5)


class ChunkError(ValueError):
    """The upstream's chunked framing is malformed."""


def _chunk_size(line: bytes) -> int:
    s = line.split(b";", 1)[0].rstrip(b" \t")
    if not s or len(s) > 16 or not _HEX.issuperset(s):
        raise ChunkError(f"malformed chunk size line {line[:40]!r}")
    return int(s, 16)


class ChunkScanner:
    __slots__ = ("state", "left", "line", "trailers", "done", "rest")

    def __init__(self) -> None:
        self.state = _SIZE
        self.left = 0  # data bytes still to come of the current chunk (_DATA), or of its CRLF
        self.line = b""  # a size or trailer line begun in an earlier read
        self.trailers = 0
        self.done = False
        self.rest = b""

    def feed(self, data: bytes) -> bytes:
        out: list[bytes] = []
        pos = 0
        n = len(data)
        raw = 0  # start of the run of whole chunks to pass on as they came
        while pos < n:
            st = self.state
            if st == _SIZE:
                if self.line:
                    pos = self._pending_line(data, pos)
                    if pos < 0:
                        return b"".join(out)
                    raw = pos
                    continue
                eol = data.find(b"\r\n", pos)
                if eol < 0:  # the size line goes on in the next read: held
                    self._hold(data[pos:])
                    out.append(data[raw:pos])
                    return b"".join(out)
                size = _chunk_size(data[pos:eol])
                start = eol + 2
                if size == 0:
                    out.append(data[raw:pos])
                    self.state = _TRAILER
                    pos = raw = start
                    continue
                end = start + size
                if end + 2 <= n:  # the whole chunk is in this read
                    if data[end : end + 2] != b"\r\n":
                        raise ChunkError("chunk data not followed by CRLF")
                    pos = end + 2
                    continue
                out.append(data[raw:pos])  # the whole chunks before it, as they came
                self.state = _DATA
                self.left = size
                pos = raw = start
            elif st == _DATA:
                take = min(self.left, n - pos)
                out.append(b"%x\r\n%b\r\n" % (take, data[pos : pos + take]))
                self.left -= take
                pos += take
                if self.left == 0:
                    self.state = _CRLF
                    self.left = 2
                raw = pos
            elif st == _CRLF:
                want = b"\r\n"[2 - self.left :]
                got = data[pos : pos + len(want)]
                if not want.startswith(got):
                    raise ChunkError("chunk data not followed by CRLF")
                pos += len(got)
                self.left -= len(got)
                if self.left == 0:
                    self.state = _SIZE
                raw = pos
            elif st == _TRAILER:
                self._trailer(data, pos)
                return b"".join(out)
            else:  # _DONE: bytes after the message
                self.rest += data[pos:]
                return b"".join(out)
        if raw < n:  # whole chunks up to the end of the read
            if raw == 0 and not out:
                return data  # only whole chunks: as they came
            out.append(data[raw:])
        return b"".join(out)

    def _hold(self, part: bytes) -> None:
        line = self.line + part
        if len(line) > MAX_LINE:
            raise ChunkError("chunk size line too long")
        self.line = line

    def _pending_line(self, data: bytes, pos: int) -> int:
        """Complete a size line begun in an earlier read: the position after it, or -1
        (still incomplete: held)."""
        held = self.line
        buf = held + data[pos : pos + MAX_LINE + 2]
        eol = buf.find(b"\r\n")
        if eol < 0:
            self.line = b""
            self._hold(held + data[pos:])
            return -1
        self.line = b""
        size = _chunk_size(buf[:eol])
        pos += eol + 2 - len(held)
        if size == 0:
            self.state = _TRAILER
        else:
            self.state = _DATA  # its data is re-framed: the size line was not passed on
            self.left = size
        return pos

    def _trailer(self, data: bytes, pos: int) -> None:
        """Consume trailer lines up to the empty line (then ``done``, and ``rest``: the
        bytes after the message)."""
        n = len(data)
        while pos < n:
            buf = self.line + data[pos:]
            eol = buf.find(b"\r\n")
            if eol < 0:
                if len(buf) > MAX_LINE:
                    raise ChunkError("trailer line too long")
                self.line = buf
                return
            used = eol + 2 - len(self.line)
            self.line = b""
            pos += used
            self.trailers += eol + 2
            if self.trailers > MAX_TRAILERS:
                raise ChunkError("trailers too long")
            if eol == 0:  # the empty line: the message has ended
                self.state = _DONE
                self.done = True
                self.rest = data[pos:]
                return
