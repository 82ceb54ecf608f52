"""The chunked-body scanner for stream pass-through (``sentinel.proxy.chunkscan``)."""

from __future__ import annotations

import random

import pytest

from sentinel.proxy.chunkscan import MAX_LINE, ChunkError, ChunkScanner

EVENTS = [b'data: {"i": %d}\n\n' % i for i in range(3)]


def wire(chunks: list[bytes], ext: bytes = b"", trailers: bytes = b"") -> bytes:
    body = b"".join(b"%x%b\r\n%b\r\n" % (len(c), ext, c) for c in chunks)
    return body + b"0" + ext + b"\r\n" + trailers + b"\r\n"


def decode(framed: bytes) -> list[bytes]:
    """A strict reference decoder of whole chunks (no last-chunk): the data of each."""
    out = []
    pos = 0
    while pos < len(framed):
        eol = framed.index(b"\r\n", pos)
        size = int(framed[pos:eol].split(b";")[0], 16)
        assert size > 0, "a last-chunk must not be passed on"
        start = eol + 2
        out.append(framed[start : start + size])
        assert framed[start + size : start + size + 2] == b"\r\n"
        pos = start + size + 2
    return out


def run(pieces: list[bytes]) -> tuple[list[bytes], ChunkScanner]:
    sc = ChunkScanner()
    outs = [sc.feed(p) for p in pieces]
    return outs, sc


def check_split(data: bytes, payload: bytes, after: bytes = b"") -> None:
    for cuts in _cuts(len(data)):
        pieces = [data[a:b] for a, b in zip((0, *cuts), (*cuts, len(data)), strict=True)]
        outs, sc = run([*pieces[:-1], pieces[-1] + after])
        for o in outs:  # every write ends on a chunk boundary
            decode(o)
        assert b"".join(b"".join(decode(o)) for o in outs) == payload, cuts
        assert sc.done and sc.rest == after, cuts


def _cuts(n: int) -> list[tuple[int, ...]]:
    one = [(i,) for i in range(1, n)]
    rnd = random.Random(n)
    two = [tuple(sorted(rnd.sample(range(1, n), 2))) for _ in range(200)] if n > 3 else []
    return [(), *one, *two, tuple(range(1, n))]  # the last: one byte per read


def test_whole_chunks_in_one_read_pass_unchanged_without_a_copy() -> None:
    data = wire(EVENTS)
    body = data[: -len(b"0\r\n\r\n")]
    sc = ChunkScanner()
    assert sc.feed(body) is body
    assert sc.feed(b"0\r\n\r\n") == b""
    assert sc.done and sc.rest == b""


def test_split_at_every_byte_offset_gives_every_byte_on_chunk_boundaries() -> None:
    check_split(wire(EVENTS), b"".join(EVENTS))


def test_chunk_extensions_are_passed_on_and_split_anywhere() -> None:
    data = wire(EVENTS, ext=b';name="v;x"')
    body = data[: data.rindex(b"\r\n0;") + 2]
    assert ChunkScanner().feed(body) is body
    check_split(data, b"".join(EVENTS))


def test_trailers_are_consumed_and_bytes_after_the_message_are_rest() -> None:
    data = wire(EVENTS, trailers=b"x-usage: 12\r\nx-other: a\r\n")
    check_split(data, b"".join(EVENTS), after=b"HTTP/1.1 200 OK\r\n")


def test_large_chunk_over_many_reads_is_reframed_as_it_arrives() -> None:
    big = bytes(range(256)) * 40
    data = wire([big, b"tail"])
    sc = ChunkScanner()
    got = []
    for i in range(0, len(data), 1000):
        out = sc.feed(data[i : i + 1000])
        got += decode(out)
    assert b"".join(got) == big + b"tail" and sc.done


def test_upper_case_hex_and_space_before_extension() -> None:
    chunk = b"x" * 0x1A
    data = b"1A ;e\r\n" + chunk + b"\r\n0\r\n\r\n"
    check_split(data, chunk)


@pytest.mark.parametrize(
    "bad",
    [
        b"zz\r\nab\r\n",  # not hex
        b"\r\nab\r\n",  # empty size
        b"-1\r\nab\r\n",
        b"0x2\r\nab\r\n",
        b"11111111111111111\r\n",  # over 16 hex digits
        b"2\r\nabXY",  # no CRLF after the data
        b"2\r\nab\rX",
    ],
)
def test_malformed_framing_is_a_chunk_error_wherever_the_read_splits(bad: bytes) -> None:
    for cut in range(len(bad) + 1):
        sc = ChunkScanner()
        with pytest.raises(ChunkError):
            sc.feed(bad[:cut])
            sc.feed(bad[cut:])


def test_endless_size_line_or_trailer_is_bounded() -> None:
    sc = ChunkScanner()
    with pytest.raises(ChunkError):
        for _ in range(MAX_LINE + 1):
            sc.feed(b"1")
    sc = ChunkScanner()
    sc.feed(b"0\r\n")
    with pytest.raises(ChunkError):
        for _ in range(100):
            sc.feed(b"x-a: " + b"b" * 500 + b"\r\n")


def test_random_bytes_raise_only_chunk_error() -> None:
    rnd = random.Random(15)
    alphabet = b"0123456789abcdefXZ;= \r\n"
    for _ in range(3000):
        data = bytes(rnd.choice(alphabet) for _ in range(rnd.randrange(1, 40)))
        sc = ChunkScanner()
        try:
            for i in range(0, len(data), rnd.randrange(1, 6)):
                decode(sc.feed(data[i : i + 5]))  # whatever it returns is whole chunks
        except ChunkError:
            pass
