"""Scrape-time counters and histograms (``sentinel.proxy.tally``) expose what
``prometheus_client``'s own ``Counter``/``Histogram`` would for the same values."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from sentinel.proxy.tally import CounterTally, HistogramTally

BUCKETS = (0.005, 0.01, 0.1, 1.0, 5.0)
VALUES = [0.0, 0.005, 0.0050001, 0.01, 0.2, 1.0, 4.99, 5.0, 7.5, 1e9, 0.003]


def _lines(registry: CollectorRegistry) -> list[str]:
    text = generate_latest(registry).decode()
    return sorted(line for line in text.splitlines() if "_created" not in line)


def test_histogram_matches_prometheus_client_bucket_for_bucket():
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    h = HistogramTally("x_seconds", "Doc.", "tier", BUCKETS, registry=ours)
    ref = Histogram("x_seconds", "Doc.", ["tier"], buckets=BUCKETS, registry=theirs)
    for i, v in enumerate(VALUES):
        tier = "local" if i % 3 else "backup"
        h.observe(tier, v)
        ref.labels(tier).observe(v)
    assert _lines(ours) == _lines(theirs)
    assert 'x_seconds_bucket{le="0.005",tier="local"}' in "\n".join(_lines(ours))


def test_counter_matches_prometheus_client_and_starts_at_zero():
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    c = CounterTally("reqs", "Doc.", ["tier", "status"], registry=ours)
    ref = Counter("reqs", "Doc.", ["tier", "status"], registry=theirs)
    c.add(("local", "200"), 0)
    ref.labels("local", "200")
    assert _lines(ours) == _lines(theirs)
    for _ in range(3):
        c.add(("local", "200"))
        ref.labels("local", "200").inc()
    c.add(("none", "404"))
    ref.labels("none", "404").inc()
    assert _lines(ours) == _lines(theirs)
    assert c.value(("local", "200")) == 3


def test_a_name_clash_is_refused_at_registration():
    registry = CollectorRegistry()
    CounterTally("reqs", "Doc.", ["tier"], registry=registry)
    try:
        Counter("reqs", "Doc.", registry=registry)
    except ValueError as exc:
        assert "reqs" in str(exc)
    else:
        raise AssertionError("a duplicate name was accepted")


def test_a_tally_that_fails_to_collect_is_counted_under_its_metric_name():
    from sentinel.ops.metrics import SentinelRegistry

    registry = SentinelRegistry()
    h = HistogramTally("x_seconds", "Doc.", "tier", BUCKETS, registry=registry)
    CounterTally("reqs", "Doc.", ["tier"], registry=registry).add(("a",))
    h.observe("a", 0.1)
    h.sums.clear()  # broken: its collect raises KeyError
    generate_latest(registry)  # (counted during this scrape: shown from the next on)
    text = generate_latest(registry).decode()
    assert 'sentinel_metrics_collector_errors_total{collector="x_seconds"} 1.0' in text
    assert 'reqs_total{tier="a"} 1.0' in text  # the other families are still there


def test_a_tiers_latency_and_first_byte_series_appear_together():
    from sentinel.proxy.metrics import ProxyMetrics

    registry = CollectorRegistry()
    m = ProxyMetrics(registry, ["local"])
    m.request("none", 400, None, 0.001)  # answered by Sentinel itself: no first byte
    text = generate_latest(registry).decode()
    assert 'sentinel_proxy_request_duration_seconds_count{tier="none"} 1.0' in text
    assert 'sentinel_proxy_time_to_first_byte_seconds_count{tier="none"} 0.0' in text
    assert 'sentinel_proxy_requests_total{status="400",tier="none"} 1.0' in text
