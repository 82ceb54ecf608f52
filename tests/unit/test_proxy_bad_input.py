"""Bad input gets an OpenAI-style error with the right 4xx, never reaches an upstream,
and leaves the proxy serving."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fake_openai import FakeOpenAI
from tests.unit.proxy_harness import ProxyHarness


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ProxyHarness, FakeOpenAI]]:
    with FakeOpenAI("a") as a:
        cfg = {"tiers": [{"name": "a", "base_url": a.url}], "max_body_bytes": 2048}
        with ProxyHarness(cfg, Path(tmp_path_factory.mktemp("bad"))) as px:
            yield px, a


def _gen(n: int) -> Iterator[bytes]:
    for _ in range(n):
        yield b"x" * 512


CASES = {
    "invalid_json": (dict(content=b'{"model": "m", "prompt": '), 400, "invalid_json"),
    "missing_model": (dict(json={"prompt": "hi"}), 400, "missing_model"),
    "empty_model": (dict(json={"model": "", "prompt": "hi"}), 400, "missing_model"),
    "not_an_object": (dict(json=["model"]), 400, "invalid_body"),
    "no_body": (dict(content=b""), 400, "missing_body"),
    "too_large_declared": (dict(json={"model": "m", "prompt": "x" * 5000}), 413, "body_too_large"),
    "too_large_chunked": (dict(content=_gen(10)), 413, "body_too_large"),
    "invalid_utf8": (
        dict(
            content=b'{"model": "m", "prompt": "\xff\xfe"}',
            headers={"content-type": "application/json"},
        ),
        400,
        "invalid_utf8",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_request_body(case: str, setup: tuple[ProxyHarness, FakeOpenAI]) -> None:
    px, a = setup
    kwargs, status, code = CASES[case]
    before = len(a.requests)
    r = httpx.post(px.url + "/v1/completions", **kwargs)  # type: ignore[arg-type]
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code
    assert err["type"] == "invalid_request_error"
    assert err["message"]
    assert r.headers["x-request-id"]
    assert len(a.requests) == before
    # Sentinel stays up and serves the next request
    ok = httpx.post(px.url + "/v1/completions", json={"model": "m", "prompt": "hi"})
    assert ok.status_code == 200


def test_error_messages_name_the_problem(setup: tuple[ProxyHarness, FakeOpenAI]) -> None:
    px, _ = setup
    r = httpx.post(px.url + "/v1/completions", json={"model": "m", "prompt": "x" * 5000})
    assert (
        "2048" in r.json()["error"]["message"] and "max_body_bytes" in r.json()["error"]["message"]
    )
    r = httpx.post(px.url + "/v1/chat/completions", json={"messages": []})
    assert r.json()["error"]["param"] == "model"


@pytest.mark.parametrize("path", ["/", "/health", "/v2/completions", "/completions"])
def test_unknown_path(path: str, setup: tuple[ProxyHarness, FakeOpenAI]) -> None:
    px, a = setup
    before = len(a.requests)
    r = httpx.post(px.url + path, json={"model": "m"})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "unknown_path"
    assert path in r.json()["error"]["message"]
    assert len(a.requests) == before


def test_a_number_with_too_many_digits_is_named_without_python_internals() -> None:
    from sentinel.config.schema import ProxyConfig
    from sentinel.proxy.errors import ProxyError
    from sentinel.proxy.request import RequestPolicy

    policy = RequestPolicy(ProxyConfig(tiers=[{"name": "a", "base_url": "http://a.invalid"}]))
    body = b'{"model": "m", "prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}"
    with pytest.raises(ProxyError) as exc:
        policy.parse_body("/v1/completions", "POST", b"application/json", body)
    assert exc.value.status == 400 and exc.value.code == "invalid_json"
    assert "too many digits" in exc.value.message
    assert "sys." not in exc.value.message and "int_max_str_digits" not in exc.value.message


def test_hop_by_hop_request_headers_are_not_forwarded() -> None:
    """Headers the client's Connection header names, and an h2c offer's HTTP2-Settings,
    are for this hop only: no tier receives them."""
    from sentinel.config.schema import ProxyConfig
    from sentinel.proxy.request import RequestPolicy

    policy = RequestPolicy(ProxyConfig(tiers=[{"name": "a", "base_url": "http://a.invalid"}]))
    headers = [
        (b"x-hop-secret", b"1"),
        (b"connection", b"Upgrade, HTTP2-Settings, X-Hop-Secret"),
        (b"upgrade", b"h2c"),
        (b"http2-settings", b"AAMAAABkAAQAAP__"),
        (b"x-kept", b"2"),
        (b"content-type", b"application/json"),
    ]
    fwd, ctype = policy.forwarded_headers(headers)
    assert fwd == [(b"x-kept", b"2"), (b"content-type", b"application/json")]
    assert ctype == b"application/json"


def test_a_repeated_request_header_reaches_the_tier_with_every_value() -> None:
    """A header sent twice (``x-tag: a`` and ``x-tag: b``) is forwarded twice, in order,
    not folded into its last value; the client's key goes to the local tier only; a
    second Content-Type or Authorization is refused."""
    from sentinel.config.schema import ProxyConfig
    from sentinel.proxy.errors import ProxyError
    from sentinel.proxy.request import RequestPolicy
    from sentinel.proxy.tier import ProxyRequest

    policy = RequestPolicy(ProxyConfig(tiers=[{"name": "a", "base_url": "http://a.invalid"}]))
    headers = [
        (b"x-tag", b"a"),
        (b"authorization", b"Bearer client-key"),
        (b"x-tag", b"b"),
        (b"x-request-id", b"client-id"),
    ]
    fwd, _ = policy.forwarded_headers(headers)
    assert fwd == [(b"x-tag", b"a"), (b"authorization", b"Bearer client-key"), (b"x-tag", b"b")]
    req = ProxyRequest("rid-1", "POST", "/v1/completions", fwd, b"{}", {}, "m", 0.0)

    class _Tier:  # Tier.headers_for reads only these
        api_key = None
        local = False

    from sentinel.proxy.tier import Tier

    sent = Tier.headers_for(_Tier(), req)  # type: ignore[arg-type]
    assert sent == [(b"x-tag", b"a"), (b"x-tag", b"b"), (b"x-request-id", b"rid-1")]
    _Tier.local = True
    sent = Tier.headers_for(_Tier(), req)  # type: ignore[arg-type]
    assert (b"authorization", b"Bearer client-key") in sent and sent[-1] == (
        b"x-request-id",
        b"rid-1",
    )
    assert fwd == [(b"x-tag", b"a"), (b"authorization", b"Bearer client-key"), (b"x-tag", b"b")]
    # a header Sentinel acts on, sent twice: the upstream might read the other value
    for twice in (b"content-type", b"authorization"):
        with pytest.raises(ProxyError) as exc:
            policy.forwarded_headers([(twice, b"text/plain"), (b"x", b"1"), (twice, b"x")])
        assert exc.value.status == 400 and exc.value.code == "duplicate_header"
        assert "more than one" in exc.value.message


def test_the_fast_json_reading_matches_the_json_module() -> None:
    """Bodies are read by msgspec first and by the json module where msgspec refuses:
    every body reads as the json module reads it, and every refusal is the json
    module's (NaN and a lone surrogate are accepted, as they always were)."""
    import json

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from sentinel.config.schema import ProxyConfig
    from sentinel.proxy.errors import ProxyError
    from sentinel.proxy.request import RequestPolicy

    policy = RequestPolicy(ProxyConfig(tiers=[{"name": "a", "base_url": "http://a.invalid"}]))
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text()
    values = st.recursive(
        scalars,
        lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(), kids, max_size=4),
        max_leaves=20,
    )

    @settings(max_examples=300, deadline=None)
    @given(values, st.booleans())
    def check(value: object, ascii_only: bool) -> None:
        body = json.dumps({"model": "m", "v": value}, ensure_ascii=ascii_only).encode(
            "utf-8", "surrogatepass"
        )
        try:
            expected = json.loads(body.decode("utf-8"))
        except UnicodeDecodeError:
            return  # a lone surrogate written raw: not UTF-8 (refused, as before)
        payload, model, _ = policy.parse_body("/v1/completions", "POST", b"", body)
        assert json.dumps(payload, sort_keys=True) == json.dumps(expected, sort_keys=True)
        assert model == "m"

    check()
    for body in (b'{"model": "m", "t": NaN}', b'{"model": "m", "s": "\\ud800"}'):
        payload, _, _ = policy.parse_body("/v1/completions", "POST", b"", body)
        assert payload is not None and payload["model"] == "m"
    for body, words in (
        (b'{"model": "m", "a": 01}', "Expecting ',' delimiter"),
        (b'{"model": "m"} x', "Extra data"),
        (b'{"model": "\xff"}', "not valid UTF-8 (bad byte at offset 11)"),
    ):
        with pytest.raises(ProxyError) as exc:
            policy.parse_body("/v1/completions", "POST", b"", body)
        assert exc.value.status == 400 and words in exc.value.message
