"""The server's Prometheus metrics, in a registry of its own (several apps in one process, as in
the tests, do not share counters)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServeMetrics:
    """Requests by endpoint and status, their latency, time to first streamed piece, batch
    sizes, queue depth and generated tokens (`rate()` of it is tokens/s)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("ferry_requests", "Requests answered", ["endpoint", "status"],
                                registry=self.registry)
        self.latency = Histogram("ferry_request_seconds", "Request latency", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.first_piece = Histogram("ferry_time_to_first_token_seconds",
                                     "Time to a stream's first piece", buckets=LATENCY_BUCKETS,
                                     registry=self.registry)
        self.batch_size = Histogram("ferry_batch_size", "Inputs per backend call",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("ferry_queue_depth", "Inputs waiting for a batch",
                                 registry=self.registry)
        self.generated_tokens = Counter("ferry_generated_tokens", "Tokens generated",
                                        registry=self.registry)

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)
