"""Prometheus metrics. Counts of live things are read from their owners at scrape time."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

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


# -- per agent, deployment and version ------------------------------------------------------------
# Label values of these come from the store (agents, their deployments, the versions their
# instances run), never from what a caller or a worker says: an agent's series exist while the
# agent does, and go with it.

AGENT = ("agent", "deployment", "version")

# Seconds from a dispatch to its session running: an agent's process starts in well under a
# second when a worker is free, and waits for one (up to the queue timeout) when none is.
SESSION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# A build reuses a cached environment in a second, and installs one in a minute or more.
BUILD_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


@dataclass(frozen=True)
class Family:
    """One metric of the per-agent set: its name, what it means, its labels after `agent`."""

    name: str
    doc: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()  # a histogram's; none: a counter (or a gauge)


SESSIONS_STARTED = Family(
    "voicefleet_sessions_started",
    "Sessions that began running on a version (a session dispatched again after its worker "
    "died counts again, on the version that runs it next).",
    AGENT[1:],
)
OUTCOMES = ("succeeded", "failed", "terminated")  # how a session ends (dispatch.jobs.ENDED)
SESSIONS_ENDED = Family(
    "voicefleet_sessions_ended",
    "Sessions that ended, by outcome (succeeded, failed, terminated); version is empty for "
    "those no worker ever took.",
    (*AGENT[1:], "outcome"),
)
SESSION_START = Family(
    "voicefleet_session_start_seconds",
    "Seconds from a session's dispatch to its running on a worker (its first start).",
    AGENT[1:],
    SESSION_BUCKETS,
)
QUEUE_WAIT = Family(
    "voicefleet_queue_wait_seconds",
    "Seconds a session waited for a worker (from entering the queue to its assignment), by the "
    "version that took it.",
    AGENT[1:],
    LATENCY_BUCKETS,
)
RESTARTS = Family(
    "voicefleet_instance_restarts",
    "Times an instance's process exited on its own (crashed) and was started again.",
    AGENT[1:],
)
BUILDS = Family(
    "voicefleet_build_duration_seconds",
    "Seconds a version's build took, by result (built, cached: an environment reused, failed).",
    ("result",),
    BUILD_BUCKETS,
)
COUNTED = (SESSIONS_STARTED, SESSIONS_ENDED, SESSION_START, QUEUE_WAIT, RESTARTS, BUILDS)


class _Histogram:
    __slots__ = ("buckets", "count", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.buckets = [0] * (len(bounds) + 1)  # the last one: +Inf
        self.count = 0
        self.sum = 0.0

    def observe(self, bounds: tuple[float, ...], value: float) -> None:
        self.buckets[bisect.bisect_left(bounds, value)] += 1
        self.count += 1
        self.sum += value

    def cumulative(self, bounds: tuple[float, ...]) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip((*map(floatToGoString, bounds), "+Inf"), self.buckets, strict=True):
            total += n
            out.append((bound, total))
        return out


class AgentSeries:
    """Counters and histograms of known agents, kept by agent id (the store's) so that they can
    go with the agent; the agent's name is put on them at scrape time."""

    def __init__(self) -> None:
        self._counts: dict[str, dict[tuple[str, ...], float]] = {}
        self._hists: dict[str, dict[tuple[str, ...], _Histogram]] = {}

    def inc(self, family: Family, agent_id: str, labels: tuple[str, ...], by: float = 1) -> None:
        key = (family.name, agent_id, *labels)
        counts = self._counts.setdefault(family.name, {})
        counts[key] = counts.get(key, 0) + by

    def ensure(self, family: Family, agent_id: str, labels: tuple[str, ...]) -> None:
        """A counter's series exists, from 0, before its first event: `rate()` sees that first
        event instead of taking the series' first value as where it began."""
        counts = self._counts.setdefault(family.name, {})
        counts.setdefault((family.name, agent_id, *labels), 0)

    def observe(self, family: Family, agent_id: str, labels: tuple[str, ...], value: float) -> None:
        hists = self._hists.setdefault(family.name, {})
        key = (family.name, agent_id, *labels)
        hist = hists.get(key)
        if hist is None:
            hist = hists[key] = _Histogram(family.buckets)
        hist.observe(family.buckets, max(value, 0.0))

    def keep_only(self, agent_ids: Collection[str]) -> None:
        """Forget every series of agents not in `agent_ids` (deleted ones)."""
        tables: list[dict[tuple[str, ...], Any]] = [*self._counts.values(), *self._hists.values()]
        for table in tables:
            for key in [k for k in table if k[1] not in agent_ids]:
                del table[key]

    def versions(self) -> set[tuple[str, str, str]]:
        """(agent id, deployment, version) of every series labelled by version."""
        out: set[tuple[str, str, str]] = set()
        for family in COUNTED:
            if family.labels[:2] == AGENT[1:]:
                table = self._hists if family.buckets else self._counts
                out.update((k[1], k[2], k[3]) for k in table.get(family.name, {}))
        return out

    def drop_version(self, agent_id: str, deployment: str, version: str) -> None:
        """Forget the series of one version of one deployment."""
        for family in COUNTED:
            if family.labels[:2] == AGENT[1:]:
                table: dict[tuple[str, ...], Any] = (
                    self._hists if family.buckets else self._counts
                ).get(family.name, {})
                for key in [k for k in table if k[1:4] == (agent_id, deployment, version)]:
                    del table[key]

    def families(self, names: Mapping[str, str]) -> Iterable[Metric]:
        """Every family, its series labelled with the agent names in `names` (by agent id);
        series of agents not in it are left out."""
        for family in COUNTED:
            labels = ["agent", *family.labels]
            if family.buckets:
                hist = HistogramMetricFamily(family.name, family.doc, labels=labels)
                for key, h in sorted(self._hists.get(family.name, {}).items()):
                    if key[1] in names:
                        hist.add_metric(
                            [names[key[1]], *key[2:]], h.cumulative(family.buckets), h.sum
                        )
                yield hist
            else:
                counter = CounterMetricFamily(family.name, family.doc, labels=labels)
                for key, n in sorted(self._counts.get(family.name, {}).items()):
                    if key[1] in names:
                        counter.add_metric([names[key[1]], *key[2:]], n)
                yield counter


class Scraped(Collector):
    """Families read at scrape time from `read()`, which returns them already built."""

    def __init__(self, read: Callable[[], Iterable[Metric]]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        yield from self._read()


def gauge_family(
    name: str, doc: str, labels: tuple[str, ...], values: Mapping[tuple[str, ...], float]
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=list(labels))
    for key, value in sorted(values.items()):
        family.add_metric(list(key), value)
    return family
