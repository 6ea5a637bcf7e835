"""What the server did, for GET /metrics: prometheus_client's registry and text exposition.

Each ServerMetrics has a CollectorRegistry of its own, never the process's global one, so several engines
(and tests) in one process do not collide. Every label set is fixed and small (route, status, reason):
labels never carry what a client sent (a path, an adapter name), so a scanner or a typo cannot grow the
series without bound. The thin Counter/Histogram wrappers take labels as keywords, as the server records.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
# (name, "counter" | "gauge", help, value), read at scrape time from where the number lives (the cache)
Reading = tuple[str, str, str, float]

# seconds; a render on the embedded model on CPU takes ~0.1-3 s, on a real model on GPU 1-10 s
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
COMPOSE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (
    1,
    2,
    3,
    4,
    6,
    8,
    12,
    16,
    24,
    32,
    64,
    128,
    256,
)  # images per render call (--max-batch <= 256)


class Counter:
    def __init__(self, name: str, help_text: str, registry: CollectorRegistry, labels: Sequence[str] = ()):
        self.name, self._registry = name, registry
        self._metric = prometheus_client.Counter(name, help_text, tuple(labels), registry=registry)

    def inc(self, amount: float = 1, **labels: str) -> None:
        (self._metric.labels(**labels) if labels else self._metric).inc(amount)

    def value(self, **labels: str) -> float:
        return self._registry.get_sample_value(self.name, labels) or 0.0


class Histogram:
    def __init__(self, name: str, help_text: str, registry: CollectorRegistry, buckets: Sequence[float],
                 labels: Sequence[str] = ()) -> None:  # fmt: skip
        self.name, self._registry = name, registry
        self._metric = prometheus_client.Histogram(
            name, help_text, tuple(labels), registry=registry, buckets=tuple(buckets)
        )

    def observe(self, value: float, **labels: str) -> None:
        (self._metric.labels(**labels) if labels else self._metric).observe(value)

    def count(self, **labels: str) -> int:
        return int(self._registry.get_sample_value(self.name + "_count", labels) or 0)

    def total(self, **labels: str) -> float:
        """The sum of the values observed (with these labels)."""
        return self._registry.get_sample_value(self.name + "_sum", labels) or 0.0


class Readings(Collector):
    """Values read at scrape time by `read` (the adapter cache's counters live in the cache, not here)."""

    def __init__(self, read: Callable[[], Iterable[Reading]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        for name, kind, help_text, value in self._read():
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(name, help_text, value=value)


class ServerMetrics:
    """The server's own series in a registry of their own; the engine, scheduler and app record into it."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.requests = Counter("difflora_requests_total", "HTTP requests answered, by route and status.", r,
                                labels=("route", "status"))  # fmt: skip
        self.latency = Histogram("difflora_request_duration_seconds", "Time to answer a request, by route.", r,
                                 LATENCY_BUCKETS, labels=("route",))  # fmt: skip
        self.queue = Histogram("difflora_queue_wait_seconds",
                               "Time a generate request waited for the model.", r, LATENCY_BUCKETS)  # fmt: skip
        self.compose = Histogram(
            "difflora_compose_duration_seconds",
            "Time to compose a request's adapter set on the model (0 when it was already composed).",
            r,
            COMPOSE_BUCKETS,
        )
        self.render = Histogram("difflora_render_duration_seconds", "Time to render a batch's images.", r,
                                LATENCY_BUCKETS)  # fmt: skip
        self.images = Counter("difflora_images_total", "Images rendered.", r)
        self.batch = Histogram("difflora_batch_images", "Images rendered in one batch (one render call).", r,
                               BATCH_BUCKETS)  # fmt: skip
        self.batches = Counter("difflora_batches_total", "Render calls, by how their adapters were applied "
                               "(fused: one composed set; mixed: each image its own set).", r,
                               labels=("mode",))  # fmt: skip
        self.rejected = Counter(
            "difflora_rejected_total",
            "Generate requests the queue did not render, by reason (queue_full, timeout, disconnected, "
            "draining).",
            r,
            labels=("reason",),
        )
        self.depth = prometheus_client.Gauge(
            "difflora_queue_depth", "Generate requests waiting for the model.", registry=r
        )

    def watch(self, read: Callable[[], Iterable[Reading]]) -> None:
        """Expose the values `read` returns, read at every scrape."""
        self.registry.register(Readings(read))

    def exposition(self) -> bytes:
        """The /metrics text (CONTENT_TYPE)."""
        return prometheus_client.generate_latest(self.registry)
