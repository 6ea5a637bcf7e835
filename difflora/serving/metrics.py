"""What the server did, in the Prometheus text exposition format (version 0.0.4), for GET /metrics.

Counters and histograms only, each with a fixed, small label set (route, status): labels never carry what
a client sent (a path, an adapter name), so a scanner or a typo cannot grow the series without bound.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
Labels = tuple[tuple[str, str], ...]

# seconds; a render on the embedded model on CPU takes ~0.1-3 s, on a real model on GPU 1-10 s
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
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
COMPOSE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def _labels(labels: Labels, extra: str = "") -> str:
    parts = [f'{key}="{_escape(value)}"' for key, value in labels]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


class Counter:
    def __init__(self, name: str, help_text: str) -> None:
        self.name, self.help = name, help_text
        self._values: dict[Labels, float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[key] = self._values.get(key, 0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(sorted(labels.items())), 0)

    def lines(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_labels(key)} {_number(value)}" for key, value in items]


class Histogram:
    """Cumulative buckets, sum and count per label set, as Prometheus histograms are exposed."""

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]) -> None:
        self.name, self.help = name, help_text
        self.buckets = tuple(sorted(buckets))
        self._series: dict[Labels, tuple[list[int], list[float]]] = {}  # counts per bucket, [sum]
        self._lock = threading.Lock()

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            counts, total = self._series.setdefault(key, ([0] * (len(self.buckets) + 1), [0.0]))
            counts[bisect.bisect_left(self.buckets, value)] += 1  # le is inclusive
            total[0] += value

    def count(self, **labels: str) -> int:
        series = self._series.get(tuple(sorted(labels.items())))
        return sum(series[0]) if series else 0

    def total(self, **labels: str) -> float:
        """The sum of the values observed (with these labels)."""
        series = self._series.get(tuple(sorted(labels.items())))
        return series[1][0] if series else 0.0

    def lines(self) -> list[str]:
        with self._lock:
            items = sorted((key, (list(c), s[0])) for key, (c, s) in self._series.items())
        lines = []
        for key, (counts, total) in items:
            running = 0
            for bound, count in zip([*self.buckets, float("inf")], counts, strict=True):
                running += count
                le = "+Inf" if bound == float("inf") else _number(bound)
                bucket = _labels(key, 'le="' + le + '"')
                lines.append(f"{self.name}_bucket{bucket} {running}")
            lines.append(f"{self.name}_sum{_labels(key)} {_number(total)}")
            lines.append(f"{self.name}_count{_labels(key)} {running}")
        return lines


def exposition(metrics: Iterable[Counter | Histogram], gauges: Iterable[tuple[str, str, str, float]]) -> str:
    """The /metrics text: each metric's HELP and TYPE, then its samples. `gauges` are (name, type, help,
    value) read at scrape time (the cache's counters live in the cache, not here)."""
    lines: list[str] = []
    for metric in metrics:
        kind = "counter" if isinstance(metric, Counter) else "histogram"
        lines += [f"# HELP {metric.name} {metric.help}", f"# TYPE {metric.name} {kind}", *metric.lines()]
    for name, kind, help_text, value in gauges:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {_number(value)}"]
    return "\n".join(lines) + "\n"


class ServerMetrics:
    """The server's own series; the engine and the app record into it."""

    def __init__(self) -> None:
        self.requests = Counter("difflora_requests_total", "HTTP requests answered, by route and status.")
        self.latency = Histogram(
            "difflora_request_duration_seconds", "Time to answer a request, by route.", LATENCY_BUCKETS
        )
        self.queue = Histogram(
            "difflora_queue_wait_seconds", "Time a generate request waited for the model.", LATENCY_BUCKETS
        )
        self.compose = Histogram(
            "difflora_compose_duration_seconds",
            "Time to compose a request's adapter set on the model (0 when it was already composed).",
            COMPOSE_BUCKETS,
        )
        self.render = Histogram(
            "difflora_render_duration_seconds", "Time to render a request's images.", LATENCY_BUCKETS
        )
        self.images = Counter("difflora_images_total", "Images rendered.")
        self.batch = Histogram(
            "difflora_batch_images", "Images rendered in one batch (one render call).", BATCH_BUCKETS
        )
        self.rejected = Counter(
            "difflora_rejected_total",
            "Generate requests the queue did not render, by reason (queue_full, timeout, disconnected, "
            "draining).",
        )

    def all(self) -> list[Counter | Histogram]:
        return [self.requests, self.latency, self.queue, self.compose, self.render, self.images, self.batch,
                self.rejected]  # fmt: skip
