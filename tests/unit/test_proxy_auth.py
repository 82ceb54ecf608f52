"""Client API keys on the traffic port (proxy.auth) and header values read from files
or the environment checked at start-up."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from sentinel.config.schema import AuthConfig, TierConfig
from sentinel.proxy.auth import Authenticator
from sentinel.proxy.errors import ProxyError
from sentinel.proxy.secrets import SecretError, load_api_key
from sentinel.proxy.service import ProxyStartError
from tests.fake_openai import FakeOpenAI
from tests.helpers import wait_for
from tests.unit.proxy_harness import ProxyHarness

ALICE = "sk-alice-0123456789abcdef"
BOB = "sk-bob-fedcba9876543210"
BODY = {"model": "m", "prompt": "hi", "max_tokens": 2}
LOCAL = TierConfig(name="local", kind="local")
PAID = TierConfig(name="external", base_url="https://api.example", api_key_env="EXT")


def authenticator(tmp_path: Path, tiers: list[TierConfig], **cfg: object) -> Authenticator:
    auth = Authenticator(AuthConfig.model_validate(cfg), tiers, CollectorRegistry())
    auth.load()
    return auth


def keyfile(tmp_path: Path, text: str = f"alice:{ALICE}\n# bob's\nbob: {BOB}\n") -> Path:
    path = tmp_path / "client-keys"
    path.write_text(text)
    return path


def test_keys_by_bearer_or_x_api_key_give_the_key_id(tmp_path: Path) -> None:
    auth = authenticator(tmp_path, [LOCAL], keys_file=keyfile(tmp_path))
    assert auth.check([(b"authorization", b"Bearer " + ALICE.encode())]) == "alice"
    assert auth.check([(b"authorization", b"bearer  " + BOB.encode())]) == "bob"
    assert auth.check([(b"x-api-key", BOB.encode())]) == "bob"
    for headers, code in [
        ([], "missing_api_key"),
        ([(b"authorization", b"Basic " + ALICE.encode())], "missing_api_key"),
        ([(b"authorization", b"Bearer " + ALICE.encode() + b"x")], "invalid_api_key"),
        ([(b"x-api-key", b"sk-nobody-0123456789")], "invalid_api_key"),
    ]:
        with pytest.raises(ProxyError) as err:
            auth.check(headers)
        assert err.value.status == 401 and err.value.code == code
        assert ALICE not in err.value.message


def test_keys_from_the_environment_and_allow_anonymous(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLIENT_KEYS", f"alice:{ALICE}, bob:{BOB}")
    auth = authenticator(tmp_path, [LOCAL], keys_env="CLIENT_KEYS", allow_anonymous=True)
    assert auth.check([(b"x-api-key", ALICE.encode())]) == "alice"
    assert auth.check([]) == "anonymous"  # allowed explicitly
    with pytest.raises(ProxyError):  # a wrong key is refused all the same
        auth.check([(b"x-api-key", b"sk-wrong-0123456789abc")])


def test_no_keys_and_a_paid_tier_is_a_start_up_error_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(SecretError) as err:
        authenticator(tmp_path, [LOCAL, PAID])
    assert "proxy.auth.keys_file" in str(err.value) and "allow_anonymous" in str(err.value)
    assert "external" in str(err.value)
    # explicitly open, or with keys: it starts
    assert authenticator(tmp_path, [LOCAL, PAID], allow_anonymous=True).check([]) == "anonymous"
    authenticator(tmp_path, [LOCAL, PAID], keys_file=keyfile(tmp_path))
    # without a paid tier, no keys means an open port (today's default config)
    assert authenticator(tmp_path, [LOCAL]).check([]) == "anonymous"


@pytest.mark.parametrize(
    "text,what",
    [
        ("alice", "expected '<id>:<key>'"),
        (f"al ice:{ALICE}", "the id may hold"),
        ("alice:short", "a key must be"),
        (f"alice:{ALICE}\nalice:{BOB}", "given twice"),
        (f"alice:{ALICE}\nbob:{ALICE}", "same key is given twice"),
        (f"alice:{ALICE}\x00x", "control"),
    ],
)
def test_a_malformed_key_file_names_the_entry_never_the_key(
    tmp_path: Path, text: str, what: str
) -> None:
    with pytest.raises(SecretError) as err:
        authenticator(tmp_path, [LOCAL], keys_file=keyfile(tmp_path, text))
    assert what in str(err.value) and "client-keys" in str(err.value)
    assert ALICE not in str(err.value) and BOB not in str(err.value)


def test_cr_lf_in_a_key_from_the_environment_is_refused_at_start_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EXT", "sk-ext-0123\r\nx-injected: 1")
    with pytest.raises(SecretError) as err:
        load_api_key("external", "EXT", None)
    assert "CR/LF" in str(err.value) and "EXT" in str(err.value)
    assert "injected" not in str(err.value)
    path = tmp_path / "k"
    path.write_text("sk-ext-0123\nx-injected: 1\n")
    with pytest.raises(SecretError):
        load_api_key("external", None, path)
    monkeypatch.setenv("CLIENT_KEYS", f"alice:{ALICE}\rx")  # a lone CR inside an entry
    with pytest.raises(SecretError):
        authenticator(tmp_path, [LOCAL], keys_env="CLIENT_KEYS")


def test_the_proxy_answers_401_without_an_upstream_request_and_records_the_key_id(
    a: FakeOpenAI, tmp_path: Path
) -> None:
    cfg = {
        "tiers": [{"name": "a", "base_url": a.url}],
        "auth": {"keys_file": str(keyfile(tmp_path))},
    }
    with ProxyHarness(cfg, tmp_path, payload_log={"sample_rate": 1.0}) as px:
        with httpx.Client(base_url=px.url, timeout=10) as c:
            r = c.post("/v1/completions", json=BODY)
            assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
            r = c.post("/v1/completions", json=BODY, headers={"x-api-key": "sk-nope-0123456789"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert a.requests == []  # no upstream request
            r = c.post(
                "/v1/completions",
                json=BODY,
                headers={"authorization": f"Bearer {ALICE}", "x-request-id": "auth-1"},
            )
            assert r.status_code == 200 and len(a.requests) == 1
        assert px.metric("sentinel_proxy_client_requests_total", client="alice") == 1
        assert px.metric("sentinel_proxy_auth_failures_total", reason="invalid_api_key") >= 1

        def record() -> dict[str, object] | None:
            for f in (tmp_path / "payloads").glob("payloads-*.jsonl"):
                for line in f.read_text().splitlines():
                    rec = json.loads(line)
                    if rec["request_id"] == "auth-1":
                        return rec
            return None

        rec = wait_for(record, 10, what="the payload record of auth-1")
        assert rec["key_id"] == "alice"
    assert ALICE not in "".join(p.read_text() for p in (tmp_path / "payloads").glob("*.jsonl"))


def test_the_proxy_does_not_start_open_with_a_paid_tier(a: FakeOpenAI, tmp_path: Path) -> None:
    key = tmp_path / "ext-key"
    key.write_text("sk-ext-0123456789abcdef\n")
    cfg = {"tiers": [{"name": "ext", "base_url": a.url, "api_key_file": str(key)}]}
    with pytest.raises(ProxyStartError) as err:
        ProxyHarness(cfg, tmp_path).start()
    assert "proxy.auth" in str(err.value)
