"""A bounded run of the request path's fuzz target (fuzz/request_path.py; run it longer
by hand: ``.venv/bin/python -m fuzz.request_path --examples 20000``)."""

from __future__ import annotations

from pathlib import Path

from fuzz.request_path import Target, check


def test_raw_bytes_into_the_request_path_keep_every_invariant(tmp_path: Path) -> None:
    target = Target(tmp_path)
    try:
        check(target, examples=400)
    finally:
        target.loop.close()
