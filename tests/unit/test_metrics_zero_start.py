"""Labelled counters an alert takes increase() of are exported at 0 before their first
event: a series born at 1 has no increase, and the alert would miss that event."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from sentinel.collectors.sentinel_metrics import RESTART_REASONS, EngineStatusCollector
from sentinel.proxy.metrics import FALLBACK_REASONS, ProxyMetrics
from sentinel.state import EngineStatus


def _exposition(collector: object) -> str:
    reg = CollectorRegistry()
    reg.register(collector)  # type: ignore[arg-type]
    return generate_latest(reg).decode()


def test_every_restart_reason_is_exported_at_zero_before_any_restart() -> None:
    text = _exposition(EngineStatusCollector(EngineStatus()))
    for reason in RESTART_REASONS:
        assert f'sentinel_engine_restarts_total{{reason="{reason}"}} 0.0' in text


def test_a_restart_counts_on_the_zero_series_and_new_reasons_still_appear() -> None:
    st = EngineStatus()
    st.record_restart("crashed", "exit 1")
    st.record_restart("operator", "by hand")
    text = _exposition(EngineStatusCollector(st))
    assert 'sentinel_engine_restarts_total{reason="crashed"} 1.0' in text
    assert 'sentinel_engine_restarts_total{reason="stalled"} 0.0' in text
    assert 'sentinel_engine_restarts_total{reason="operator"} 1.0' in text


def test_proxy_fallbacks_rejections_and_disconnects_start_at_zero_per_tier() -> None:
    reg = CollectorRegistry()
    m = ProxyMetrics(reg, ["local", "backup"])
    text = generate_latest(reg).decode()
    for tier in ("local", "backup"):
        for reason in FALLBACK_REASONS:
            assert f'sentinel_proxy_fallbacks_total{{reason="{reason}",tier="{tier}"}} 0.0' in text
        assert f'sentinel_proxy_client_disconnects_total{{tier="{tier}"}} 0.0' in text
    assert 'sentinel_proxy_rejected_total{reason="capacity"} 0.0' in text
    m.fallback("local", "not_ready")
    text = generate_latest(reg).decode()
    assert 'sentinel_proxy_fallbacks_total{reason="not_ready",tier="local"} 1.0' in text
