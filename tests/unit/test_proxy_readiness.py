"""/readyz with the proxy: ``proxy.readiness`` = ``local_engine`` (today's meaning) or
``any_tier`` (this pod can serve through some tier); a stopped proxy is never ready."""

from __future__ import annotations

from pathlib import Path

import pytest

from sentinel.probes.readiness import pod_readiness
from sentinel.state import EngineStatus
from tests.unit.proxy_harness import ProxyHarness, ready_status

TIERS = [{"name": "local", "kind": "local"}, {"name": "backup", "base_url": "http://127.0.0.1:9"}]
ENGINE_DOWN = {"lifecycle": {"ok": False, "detail": "engine is restarting"}}


def test_pod_readiness_modes() -> None:
    ok, checks = pod_readiness(
        False, ENGINE_DOWN, (True, "tiers that can serve: backup"), "any_tier"
    )
    assert ok is True and checks["proxy"]["ok"] and not checks["lifecycle"]["ok"]
    ok, _ = pod_readiness(False, ENGINE_DOWN, (True, "proxy serving"), "local_engine")
    assert ok is False
    ok, checks = pod_readiness(True, {}, (False, "proxy stopped: boom"), "local_engine")
    assert ok is False and checks["proxy"]["detail"] == "proxy stopped: boom"


def test_any_tier_follows_the_tiers_and_a_crashed_proxy_is_not_ready(tmp_path: Path) -> None:
    status = EngineStatus()  # the local engine is not ready
    with ProxyHarness({"tiers": TIERS, "readiness": "any_tier"}, tmp_path, status=status) as h:
        svc = h.service
        assert svc is not None
        (ok, detail), mode = svc.readiness()
        assert mode == "any_tier" and ok and "backup" in detail
        backup = svc.chain.tiers[1]
        h.call(lambda: [backup.breaker.failure() for _ in range(5)])
        (ok, detail), _ = svc.readiness()
        assert not ok and "no tier" in detail
        svc.failed = "RuntimeError: boom"
        (ok, detail), _ = svc.readiness()
        assert not ok and "boom" in detail


def test_local_engine_mode_leaves_the_engine_checks_in_charge(tmp_path: Path) -> None:
    with ProxyHarness({"tiers": TIERS}, tmp_path, status=ready_status()) as h:
        svc = h.service
        assert svc is not None
        (ok, _), mode = svc.readiness()
        assert ok and mode == "local_engine"


def test_a_crashed_proxy_task_is_logged_and_fails_readiness(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio
    from types import SimpleNamespace

    from sentinel.app import Sentinel

    with ProxyHarness({"tiers": TIERS}, tmp_path, status=ready_status()) as h:
        svc = h.service
        assert svc is not None

        async def crash() -> None:
            raise RuntimeError("proxy bug")

        async def main() -> None:
            task = asyncio.create_task(crash())
            with pytest.raises(RuntimeError):
                await task
            Sentinel._proxy_stopped(SimpleNamespace(proxy=svc), task)  # type: ignore[arg-type]

        asyncio.run(main())
        (ok, detail), _ = svc.readiness()
        assert not ok and "RuntimeError: proxy bug" in detail
    out = capsys.readouterr()
    assert "proxy stopped serving" in out.out + out.err
    assert "Traceback" in out.out + out.err
