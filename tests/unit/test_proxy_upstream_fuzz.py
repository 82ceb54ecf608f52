"""A bounded run of the upstream-response fuzz target (fuzz/upstream_response.py; run
it for minutes by hand with ``python -m fuzz.upstream_response --examples 20000``)."""

from __future__ import annotations

from fuzz.upstream_response import fuzz


def test_broken_upstream_answers_never_escape_leak_or_cross_requests() -> None:
    fuzz(300)
