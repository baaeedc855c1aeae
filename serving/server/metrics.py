"""Prometheus metrics under TF Serving's names.

    :tensorflow:serving:request_count{model_name, status}        count (untyped)
    :tensorflow:serving:request_latency{model_name, API, entrypoint}   histogram, microseconds

served at the monitoring config's path on the REST port when
prometheus_config { enable: true } is given. Only configured model names
become label values; requests for any other name are counted under
UNKNOWN_MODEL, so clients cannot grow the page (and the server's memory)
with names of their choosing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import Metric

REQUEST_COUNT = ":tensorflow:serving:request_count"
REQUEST_LATENCY = ":tensorflow:serving:request_latency"
DEFAULT_PATH = "/monitoring/prometheus/metrics"
UNKNOWN_MODEL = "<unknown>"
# Microseconds, 10us to ~30s on a 1.5x ladder, close to TF Serving's buckets.
LATENCY_BUCKETS = tuple(round(10 * 1.5**i) for i in range(37))


class _RequestCounter:
    """A monotonic count exposed under TF Serving's exact name. prometheus_client
    renames counter families to `..._total`, so it is declared untyped: the
    samples then keep the name TF Serving dashboards query."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = {}

    def inc(self, model_name: str, status: str) -> None:
        with self._lock:
            self._counts[(model_name, status)] = self._counts.get((model_name, status), 0) + 1

    def collect(self):
        metric = Metric(REQUEST_COUNT, "The total number of requests.", "unknown")
        with self._lock:
            for (model_name, status), count in sorted(self._counts.items()):
                metric.add_sample(REQUEST_COUNT, {"model_name": model_name, "status": status}, count)
        yield metric


class ServingMetrics:
    def __init__(self, is_configured: Callable[[str], bool] = lambda name: True):
        self._is_configured = is_configured
        disable_created_metrics()  # TF Serving exposes no *_created series
        self.registry = CollectorRegistry()
        self._requests = _RequestCounter()
        self.registry.register(self._requests)
        self._latency = Histogram(REQUEST_LATENCY, "Distribution of wall time (in microseconds) of requests.",
                                  ["model_name", "API", "entrypoint"], buckets=LATENCY_BUCKETS,
                                  registry=self.registry)
        self._latency_children: dict[tuple[str, str, str], Histogram] = {}

    def record(self, model_name: str, api: str, entrypoint: str, status: str, seconds: float) -> None:
        if not self._is_configured(model_name):
            model_name = UNKNOWN_MODEL
        self._requests.inc(model_name, status)
        key = (model_name, api, entrypoint)
        # The labelled histogram is looked up by prometheus_client once per label set, not per request.
        child = self._latency_children.get(key)
        if child is None:
            child = self._latency_children.setdefault(key, self._latency.labels(*key))
        child.observe(seconds * 1e6)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
