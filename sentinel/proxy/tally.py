"""Per-request counters and histograms as plain numbers, turned into Prometheus series
at scrape time (the way ``prometheus_client``'s own process collector works).

Counting a request with ``prometheus_client``'s ``Counter``/``Histogram`` costs a lock
and a few Python calls per value (a histogram observation: two ``inc`` under a lock,
after two checks): about a tenth of the proxy's own work per whole answer. These keep a
dict entry per label set and, for a histogram, one list of per-bucket counts: an
observation is a ``bisect`` and two additions, and the cumulative ``le`` buckets are
computed when ``/metrics`` is read. Counting happens on the event loop only, and so do
scrapes of ``/metrics``; an incident snapshot renders the metrics from a worker thread,
and may then see one observation's skew between a histogram's ``_count`` and ``_sum``
(no lock is taken for that: a snapshot is a picture of a moving process anyway).

The series look as ``Counter``/``Histogram`` ones do (``_total``; ``_bucket`` with
``le``, ``_count``, ``_sum``), without the ``_created`` samples.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString


class CounterTally:
    """A counter family: ``values[labels] += 1`` (``add``), exported as ``<name>_total``."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.name = name
        self.collector_label = name  # what a failing collect is counted as
        self.documentation = documentation
        self.labelnames = list(labelnames)
        self.values: dict[tuple[str, ...], float] = {}
        if registry is not None:
            registry.register(self)

    def add(self, labels: tuple[str, ...], amount: float = 1.0) -> None:
        values = self.values
        values[labels] = values.get(labels, 0.0) + amount

    def value(self, labels: tuple[str, ...]) -> float:
        return self.values.get(labels, 0.0)

    def describe(self) -> list[Metric]:
        return [CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, v in list(self.values.items()):
            family.add_metric(list(labels), v)
        yield family


class HistogramTally:
    """A histogram family with one label value per child (e.g. the tier): ``child(label)``
    is a list of per-bucket counts, the last one past every bound, and ``observe`` adds
    to it. Buckets are upper bounds, inclusive (``le``), as Prometheus has them."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelname: str,
        buckets: Sequence[float],
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.name = name
        self.collector_label = name
        self.documentation = documentation
        self.labelname = labelname
        self.bounds = tuple(float(b) for b in buckets)
        if list(self.bounds) != sorted(set(self.bounds)):
            raise ValueError(f"{name}: buckets must be increasing")
        self.counts: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}
        if registry is not None:
            registry.register(self)

    def child(self, label: str) -> list[int]:
        counts = self.counts.get(label)
        if counts is None:
            self.sums[label] = 0.0  # (first: a collect sees a child's counts with its sum)
            counts = self.counts[label] = [0] * (len(self.bounds) + 1)
        return counts

    def observe(self, label: str, value: float) -> None:
        counts = self.counts.get(label)
        if counts is None:
            counts = self.child(label)
        counts[bisect_left(self.bounds, value)] += 1
        self.sums[label] += value

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=[self.labelname])]

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.labelname])
        edges = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        for label, counts in list(self.counts.items()):
            running = 0
            buckets = []
            for edge, n in zip(edges, counts, strict=True):
                running += n
                buckets.append((edge, running))
            family.add_metric([label], buckets, self.sums[label])
        yield family
