"""sentinel.logs: redaction of every log event (nested values included) and LogThrottle."""

from __future__ import annotations

import json

from sentinel.logs import REDACTED, LogThrottle, redact_secrets


def test_a_secret_named_value_is_masked_whatever_its_type_and_depth() -> None:
    event = {
        "event": "upstream said no",
        "api_key": {"value": "sk-nested-0123456789"},
        "request": {
            "headers": {"Authorization": ["Bearer abcdefghijkl"], "accept": "json"},
            "body": {"password": 12345678, "prompt": "token=hunter2-xyz"},
        },
        "attempts": [{"x-api-key": "k-0123456789"}, "Bearer zyxwvutsrqpo"],
        "exc_info": False,
        "n": 3,
    }
    out = redact_secrets(None, "info", dict(event))
    text = json.dumps(out)
    for secret in ("sk-nested", "abcdefghijkl", "12345678", "hunter2", "k-0123456789", "zyxw"):
        assert secret not in text, text
    assert out["api_key"] == REDACTED
    assert out["request"]["headers"]["Authorization"] == REDACTED
    assert out["request"]["headers"]["accept"] == "json" and out["n"] == 3
    assert out["event"] == "upstream said no"


def test_throttle_logs_once_per_key_per_window_and_counts_the_rest() -> None:
    now = [0.0]
    throttle = LogThrottle(60, lambda: now[0])
    seen = []
    for t in (0, 1, 30, 59.9, 60, 61, 200):
        now[0] = t
        seen.append((t, throttle.allow("wrong"), throttle.allow("missing") if t == 1 else None))
    assert [t for t, got, _ in seen if got is not None] == [0, 60, 200]
    assert seen[4][1] == {"suppressed": 3, "suppressed_over_s": 60.0}  # 1, 30 and 59.9 s
    assert seen[6][1] == {"suppressed": 1, "suppressed_over_s": 140.0}
    assert seen[1][2] == {}  # another key: its own window


def test_throttle_forgets_the_oldest_key_past_its_limit() -> None:
    throttle = LogThrottle(60, lambda: 0.0, max_keys=2)
    assert throttle.allow("a") == {} and throttle.allow("b") == {}
    assert throttle.allow("c") == {}  # "a" forgotten
    assert throttle.allow("a") == {} and throttle.allow("c") is None
