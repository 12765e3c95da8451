"""Prometheus metrics. Counts of live things are read from their owners at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Dispatch latency is sub-millisecond on loopback and seconds when a job waits for a worker.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
)  # fmt: skip


class _Gauges(Collector):
    def __init__(self, name: str, doc: str, label: str, read: Callable[[], Mapping[str, int]]):
        self._name, self._doc, self._label, self._read = name, doc, label, read

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(self._name, self._doc, labels=[self._label])
        for value, count in self._read().items():
            family.add_metric([str(value)], count)
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs_total = Counter(
            "voicefleet_jobs_total",
            "Jobs that reached each state.",
            ["state"],
            registry=self.registry,
        )
        self.offers = Counter(
            "voicefleet_offers_total",
            "Availability requests sent to workers, by outcome "
            "(accepted, refused, timeout, worker_gone).",
            ["outcome"],
            registry=self.registry,
        )
        self.dispatch_latency = Histogram(
            "voicefleet_dispatch_latency_seconds",
            "Time from a job's entering the queue (its creation, or its worker's death) to its "
            "assignment being sent to a worker.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.redispatches = Counter(
            "voicefleet_jobs_redispatched_total",
            "Jobs dispatched again because their worker died mid-session (JRP_ON_FAILURE).",
            registry=self.registry,
        )
        self.worker_connections = Counter(
            "voicefleet_worker_connections_total",
            "Worker WebSocket connections, by outcome (registered, rejected, protocol_error).",
            ["outcome"],
            registry=self.registry,
        )

        self.routing_overflow = Counter(
            "voicefleet_routing_overflow_total",
            "Sessions whose routed version had no free worker and went to another routed version "
            '(agent names no worker registered with and no routing entry has: "(unknown)").',
            ["agent_name", "routed", "served"],
            registry=self.registry,
        )
        self.failed_sessions = Counter(
            "voicefleet_failed_sessions",
            "Sessions that ended failed, by kind of reason "
            "(crashed, killed, exited, not_started, worker_lost, no_worker, other).",
            ["kind"],
            registry=self.registry,
        )

    def gauge(self, name: str, doc: str, label: str, read: Callable[[], Mapping[str, int]]) -> None:
        """Publish a gauge whose values `read()` gives at scrape time."""
        self.registry.register(_Gauges(name, doc, label, read))
