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
