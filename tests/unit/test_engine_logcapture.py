"""Engine output: line splitting, role parsing from vLLM prefixes, the bounded tail."""

from __future__ import annotations

import pytest

from sentinel.engine.logcapture import MAX_LINE_CHARS, LineSplitter, LogTail, parse_prefix


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("(APIServer pid=812) INFO 11-21 15:05:25 [api_utils.py:347] hi", ("api_server", 812)),
        ("(EngineCore pid=901) INFO 11-21 15:05:40 [core.py:1] x", ("engine_core", 901)),
        ("(EngineCore_DP0 pid=902) WARNING 11-21 [core.py:1] x", ("engine_core", 902)),
        ("(Worker pid=950) INFO 11-21 [worker.py:1] x", ("worker", 950)),
        ("(Worker_TP1 pid=951) INFO x", ("worker", 951)),
        ("(Worker_DP0_PP1_TP3 pid=952) INFO x", ("worker", 952)),
        ("(VllmWorker-0 pid=953) WARNING 11-21 15:25:39 [vllm.py:725] x", ("worker", 953)),
        ("(DPCoordinator pid=960) INFO x", ("coordinator", 960)),
        ("(SomethingNew pid=970) INFO x", ("other", 970)),
        ("Traceback (most recent call last):", None),
        ("OSError: [Errno 98] Address already in use", None),
        ('  File "x.py", line 3, in <module> (pid=5)', None),
    ],
)
def test_parse_prefix(line: str, expected: tuple[str, int] | None) -> None:
    assert parse_prefix(line) == expected


def test_prefix_after_a_custom_logging_prefix() -> None:
    assert parse_prefix("[node-3] (Worker pid=7) INFO x") == ("worker", 7)


def test_splitter_joins_partial_chunks_and_handles_cr() -> None:
    s = LineSplitter("stdout")
    assert s.feed(b"(APIServer pid=1) INFO hel") == []
    lines = s.feed(b"lo\r\nprogress 10%\rprogress 20%\n\n(Worker pid=2) INFO w")
    assert [(ln.role, ln.pid, ln.text) for ln in lines] == [
        ("api_server", 1, "(APIServer pid=1) INFO hello"),
        ("api_server", 1, "progress 10%"),
        ("api_server", 1, "progress 20%"),
    ]
    rest = s.flush()
    assert [(ln.role, ln.pid, ln.stream) for ln in rest] == [("worker", 2, "stdout")]


def test_unprefixed_lines_inherit_the_last_role_on_the_stream() -> None:
    s = LineSplitter("stderr")
    first = s.feed(b"Traceback (most recent call last):\n")
    assert first[0].role == "other" and first[0].pid is None
    lines = s.feed(b"(EngineCore pid=9) ERROR boom\nValueError: bad\n")
    assert [(ln.role, ln.pid) for ln in lines] == [("engine_core", 9), ("engine_core", 9)]


def test_ansi_colours_are_stripped_and_invalid_utf8_replaced() -> None:
    s = LineSplitter("stdout")
    (line,) = s.feed(b"\x1b[0;36m(APIServer pid=3)\x1b[0;0m INFO \xff ok\n")
    assert line.role == "api_server"
    assert line.text.startswith("(APIServer pid=3) INFO ")
    assert "\x1b" not in line.text


def test_long_lines_are_cut() -> None:
    s = LineSplitter("stdout")
    (line,) = s.feed(b"x" * (MAX_LINE_CHARS * 2) + b"\n")
    assert len(line.text) < MAX_LINE_CHARS + 20
    assert line.text.endswith("[truncated]")


def test_unterminated_flood_is_bounded() -> None:
    s = LineSplitter("stdout")
    out = []
    for _ in range(10):
        out += s.feed(b"y" * MAX_LINE_CHARS)
    assert out, "a never-ending line must still come out, cut"
    assert len(s._buf) <= MAX_LINE_CHARS * 4


def test_secrets_in_engine_lines_are_redacted() -> None:
    s = LineSplitter("stdout")
    (line,) = s.feed(b"(APIServer pid=1) INFO args: api_key=supersecretvalue sk-abcdefghijkl\n")
    assert "supersecretvalue" not in line.text
    assert "sk-abcdefghijkl" not in line.text


def test_log_tail_is_bounded_and_filters_by_generation() -> None:
    tail = LogTail(max_lines=3)
    for i in range(5):
        tail.append(1 if i < 3 else 2, f"l{i}")
    assert tail.lines() == ["l2", "l3", "l4"]
    assert tail.lines(generation=2) == ["l3", "l4"]
    assert tail.lines(last=1) == ["l4"]


def test_terminal_control_sequences_are_stripped() -> None:
    # OSC 52 (write the clipboard), OSC 0 (window title), OSC 8 (link) with both terminators,
    # a DCS string, a cursor move, a bell and a backspace: none reaches a reader's terminal
    s = LineSplitter("stdout")
    raw = (
        b"(APIServer pid=7) INFO prompt: \x1b]52;c;cm0gLXJmIH4K\x1b\\ \x1b]0;owned\x07"
        b"\x1b]8;;https://evil.example\x1b\\click\x1b]8;;\x1b\\ \x1bPq#0\x1b\\\x1b[?25l"
        b"\x07\x08\ttab kept\xc2\x9b\n"  # the last: U+009B, the one-byte CSI
    )
    (line,) = s.feed(raw)
    assert line.text == "(APIServer pid=7) INFO prompt:  click \ttab kept"
    assert line.role == "api_server"
