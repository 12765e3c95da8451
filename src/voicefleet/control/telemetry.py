"""Per agent, deployment and version metrics: what `/metrics` says of each known agent.

Label values come from the store (agents, their deployments) and from what the server itself
issued (the version and deployment an instance was started with), never from a caller's or a
worker's words: a job for an agent name the store does not have counts in no per-agent series.
Counts of live things (sessions, queue, instances, rollouts, the autoscaler's last decision)
are read at scrape time from their owners; what happened (sessions started and ended, waits,
crashes, builds) is counted as it happens, by agent id, and goes when the agent is deleted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client.core import Metric

from voicefleet.autoscale.loop import Autoscaler
from voicefleet.autoscale.policy import KINDS
from voicefleet.dispatch.jobs import Job, JobState
from voicefleet.dispatch.service import DispatchService
from voicefleet.fleet import Instances, Lifecycle
from voicefleet.metrics import (
    AGENT,
    BUILDS,
    OUTCOMES,
    QUEUE_WAIT,
    RESTARTS,
    SESSION_START,
    SESSIONS_ENDED,
    SESSIONS_STARTED,
    AgentSeries,
    Metrics,
    Scraped,
    gauge_family,
)
from voicefleet.rollout.model import RUNNING
from voicefleet.runtime import InstanceStatus
from voicefleet.store.models import DeploymentRow, InstanceRow, RolloutRow
from voicefleet.store.repo import Repo

log = logging.getLogger("voicefleet.metrics")

LIVE_STATES = (JobState.ASSIGNED, JobState.RUNNING)
# A version's series stay this long after it last ran an instance or a session.
RETIRED_AFTER = 3600.0
RETIRE_EVERY = 60.0  # ...looked at this often (a pass over the open sessions: ms per 1,000)
# Read once: an enum member read through its class costs microseconds on Python 3.11.
_PENDING, _ASSIGNED, _RUNNING = JobState.PENDING, JobState.ASSIGNED, JobState.RUNNING
_OUTCOME = {s: str(s) for s in (JobState.SUCCEEDED, JobState.FAILED, JobState.TERMINATED)}
SHOWN_STATUSES = [s for s in Lifecycle if s != Lifecycle.STOPPED]  # stopped ones pile up


@dataclass
class _Catalog:
    """What the store holds, as of the last refresh."""

    names: dict[str, str] = field(default_factory=dict)  # agent id -> name
    ids: dict[str, str] = field(default_factory=dict)  # name -> agent id
    deployments: list[DeploymentRow] = field(default_factory=list)
    instances: list[InstanceRow] = field(default_factory=list)
    rollouts: list[RolloutRow] = field(default_factory=list)
    # (agent id, deployment name) of every deployment: looked up for each job, on the hot path.
    pairs: frozenset[tuple[str, str]] = frozenset()


class Telemetry:
    def __init__(
        self,
        metrics: Metrics,
        repo: Repo,
        dispatch: DispatchService,
        fleet: Instances,
        autoscaler: Autoscaler,
        retired_after: float = RETIRED_AFTER,
    ) -> None:
        self.repo, self.dispatch, self.fleet, self.autoscaler = repo, dispatch, fleet, autoscaler
        self.series = AgentSeries()
        self.catalog = _Catalog()
        # When each (agent id, deployment, version) with series last ran an instance or had a
        # session open; its series go `retired_after` seconds after that.
        self.retired_after = retired_after
        self._live_at: dict[tuple[str, str, str], float] = {}
        self._retired_at = -RETIRE_EVERY
        dispatch.on_job_change(self.job_changed)
        fleet.runtime.on_change(self._instance_changed)
        metrics.registry.register(Scraped(self.collect))

    async def refresh(self) -> None:
        """Read the store's agents, deployments, instances and rollouts; forget deleted
        agents' series."""
        agents = await self.repo.agents()
        deployments = await self.repo.deployments()
        catalog = _Catalog(
            names={a.id: a.name for a in agents},
            ids={a.name: a.id for a in agents},
            deployments=deployments,
            instances=await self.repo.instances(statuses=SHOWN_STATUSES),
            rollouts=await self.repo.rollouts(states=list(RUNNING), limit=1000),
            pairs=frozenset((d.agent_id, d.name) for d in deployments),
        )
        self.catalog = catalog
        self.series.keep_only(catalog.names)
        for row in catalog.instances:  # a version's series exist from 0 once it runs
            labels = (row.deployment, row.version)
            self.series.ensure(SESSIONS_STARTED, row.agent_id, labels)
            self.series.ensure(RESTARTS, row.agent_id, labels)
            for outcome in OUTCOMES:
                self.series.ensure(SESSIONS_ENDED, row.agent_id, (*labels, outcome))
        now = time.monotonic()
        if now - self._retired_at >= RETIRE_EVERY:  # a pass over every open session
            self._retired_at = now
            self._retire(catalog, now)

    def _retire(self, catalog: _Catalog, now: float) -> None:
        """Forget the series of versions that have not run for `retired_after`: an agent
        deployed ten times a day would otherwise keep every version's series while the
        server runs."""
        live = {(r.agent_id, r.deployment, r.version) for r in catalog.instances}
        live.update(labels for j in self.dispatch.open_jobs() if (labels := self._labels(j)))
        for key in live:
            self._live_at[key] = now
        for key in self.series.versions() - self._live_at.keys():
            self._live_at[key] = now  # counted since it last ran: its clock starts now
        for key, at in list(self._live_at.items()):
            if now - at > self.retired_after:
                del self._live_at[key]
                self.series.drop_version(*key)

    async def run(self, interval: float = 5.0) -> None:
        """Keep the catalog fresh between scrapes (new agents and deployments); until
        cancelled."""
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reading the store for metrics failed; retrying")
            await asyncio.sleep(interval)

    # -- what happens, counted as it happens --------------------------------------------------

    def _labels(self, job: Job) -> tuple[str, str, str] | None:
        """(agent id, deployment, version) of a job of a known agent, else None."""
        catalog = self.catalog
        # An instance's credentials name its agent: a deleted agent's (still draining) is not
        # another agent's of the same name. Otherwise (a worker started by hand, or no worker
        # yet) the name the store knows.
        agent_id = job.agent_id or catalog.ids.get(job.agent_name)
        if agent_id is None or agent_id not in catalog.names:
            return None
        state = self.fleet.state(job.instance) if job.instance else None
        if state is not None:
            deployment = state.spec.deployment
        else:
            deployment = job.deployment or self.dispatch.default_deployment
            if (agent_id, deployment) not in catalog.pairs:
                deployment = ""
        return agent_id, deployment, job.version

    def job_changed(self, job: Job, previous: JobState | None) -> None:
        # On the dispatch hot path: enum members are read once, at import (see _PENDING).
        state = job.state
        if previous is state or state is _PENDING:
            return
        labels = self._labels(job)
        if labels is None:
            return
        agent_id, dep_version = labels[0], labels[1:]
        if state is _ASSIGNED:
            if previous is _PENDING:
                wait = job.assigned_at - job.queued_at
                self.series.observe(QUEUE_WAIT, agent_id, dep_version, wait)
        elif state is _RUNNING:
            self.series.inc(SESSIONS_STARTED, agent_id, dep_version)
            if not job.redispatches:
                start = job.started_at - job.created_at
                self.series.observe(SESSION_START, agent_id, dep_version, start)
        else:
            self.series.inc(SESSIONS_ENDED, agent_id, (*dep_version, _OUTCOME[state]))

    def _instance_changed(self, instance_id: str, status: InstanceStatus) -> None:
        if status != InstanceStatus.FAILED:
            return
        state = self.fleet.state(instance_id)
        if state is not None and state.spec.agent_id in self.catalog.names:
            spec = state.spec
            self.series.inc(RESTARTS, spec.agent_id, (spec.deployment, spec.version))

    def build_finished(self, agent_id: str, result: str, seconds: float) -> None:
        """A version's build ended: `result` is built, cached or failed."""
        self.series.observe(BUILDS, agent_id, (result,), seconds)

    # -- what is, read at scrape time ---------------------------------------------------------

    def collect(self) -> Iterable[Metric]:
        catalog, names = self.catalog, self.catalog.names
        now = time.time()
        live: dict[tuple[str, ...], float] = {}
        queued: dict[tuple[str, ...], float] = {}
        oldest: dict[tuple[str, ...], float] = {}
        for job in self.dispatch.open_jobs():
            labels = self._labels(job)
            if labels is None:
                continue
            agent_id, deployment, version = labels
            if job.state in LIVE_STATES:
                key: tuple[str, ...] = (names[agent_id], deployment, version)
                live[key] = live.get(key, 0) + 1
            elif job.state == JobState.PENDING:
                key = (names[agent_id], deployment)
                queued[key] = queued.get(key, 0) + 1
                oldest[key] = max(oldest.get(key, 0.0), now - job.queued_at)
        yield gauge_family(
            "voicefleet_live_sessions",
            "Sessions assigned to a worker or running, not ended.",
            AGENT,
            live,
        )
        yield gauge_family(
            "voicefleet_queued_sessions",
            "Sessions waiting for a worker.",
            AGENT[:2],
            queued,
        )
        yield gauge_family(
            "voicefleet_queue_oldest_wait_seconds",
            "Seconds the longest-waiting queued session has waited for a worker.",
            AGENT[:2],
            oldest,
        )
        yield from self.series.families(names)
        yield from self._instances(catalog)
        yield from self._routing(catalog)
        yield from self._rollouts(catalog)
        yield from self._autoscaler(catalog)

    def _instances(self, catalog: _Catalog) -> Iterable[Metric]:
        counts: dict[tuple[str, ...], float] = {}
        for row in catalog.instances:
            name = catalog.names.get(row.agent_id)
            if name is not None:
                key = (name, row.deployment, row.version, row.status)
                counts[key] = counts.get(key, 0) + 1
        yield gauge_family(
            "voicefleet_instances",
            "Instances by status as the store records them (starting, ready, failed, retiring, "
            "draining; stopped ones are not shown).",
            (*AGENT, "status"),
            counts,
        )

    def _routing(self, catalog: _Catalog) -> Iterable[Metric]:
        weights: dict[tuple[str, ...], float] = {}
        for dep in catalog.deployments:
            name = catalog.names.get(dep.agent_id)
            routed = self.dispatch.weights(name, dep.name) if name is not None else None
            for version, weight in (routed or {}).items():
                weights[(name or "", dep.name, version)] = weight
        yield gauge_family(
            "voicefleet_routing_weight",
            "The share (percent) of new sessions each version of a deployment takes now.",
            AGENT,
            weights,
        )

    def _rollouts(self, catalog: _Catalog) -> Iterable[Metric]:
        weight: dict[tuple[str, ...], float] = {}
        step: dict[tuple[str, ...], float] = {}
        for r in catalog.rollouts:
            name = catalog.names.get(r.agent_id)
            if name is None:
                continue
            key = (name, r.deployment, r.to_version, r.from_version, r.strategy)
            weight[key] = r.weight
            number = int(r.step[5:]) + 1 if r.step.startswith("step:") else 0
            step[(*key, r.step, r.state)] = number
        labels = (*AGENT, "stable_version", "strategy")
        yield gauge_family(
            "voicefleet_rollout_weight",
            "A rollout under way: the share (percent) of new sessions its version takes.",
            labels,
            weight,
        )
        yield gauge_family(
            "voicefleet_rollout_step",
            "A rollout under way: the step it is at (label step; the value is a canary's step "
            "number, from 1, and 0 before its first step or for other strategies).",
            (*labels, "step", "state"),
            step,
        )

    def _autoscaler(self, catalog: _Catalog) -> Iterable[Metric]:
        desired: dict[tuple[str, ...], float] = {}
        actual: dict[tuple[str, ...], float] = {}
        reason: dict[tuple[str, ...], float] = {}
        for dep in catalog.deployments:
            name = catalog.names.get(dep.agent_id)
            last = self.autoscaler.last(dep.agent_id, dep.name)
            if name is None or dep.autoscale is None or last is None:
                continue
            point, decision = last
            desired[(name, dep.name)] = decision.desired
            actual[(name, dep.name)] = point.instances
            for kind in KINDS:
                reason[(name, dep.name, kind)] = float(kind == decision.kind)
        yield gauge_family(
            "voicefleet_autoscaler_desired_instances",
            "Instances the autoscaler's last decision wants for an autoscaled deployment.",
            AGENT[:2],
            desired,
        )
        yield gauge_family(
            "voicefleet_autoscaler_instances",
            "Instances of an autoscaled deployment's serving version at the autoscaler's last "
            "tick.",
            AGENT[:2],
            actual,
        )
        yield gauge_family(
            "voicefleet_autoscaler_decision",
            "The kind of the autoscaler's last decision: 1 for its reason, 0 for the others "
            f"({', '.join(KINDS)}).",
            (*AGENT[:2], "reason"),
            reason,
        )
