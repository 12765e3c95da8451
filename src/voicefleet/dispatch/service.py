"""The dispatch server's parts wired together, and the one interface the layers above use.

`DispatchService` is the dispatcher's facade: the control plane, the fleet, rollouts, the
autoscaler and the API go through its methods (routing weights, what the dispatcher sees of an
instance, draining an instance's worker, queued jobs, overflow counts, pinned dispatches,
job and dispatch listeners), never through the registry, job book or scheduler themselves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass

from livekit.protocol import agent_dispatch

from voicefleet.config import DispatchSettings, Project
from voicefleet.dispatch.jobs import (
    ENDED,
    Dispatch,
    DispatchListener,
    Job,
    JobBook,
    JobListener,
    JobState,
    Upstream,
    new_id,
)
from voicefleet.dispatch.registry import PoolKey, PoolLoad, Registry, Worker
from voicefleet.dispatch.routing import RoutingTable
from voicefleet.dispatch.scheduler import Scheduler
from voicefleet.dispatch.stats import VersionStats, Window
from voicefleet.errors import InvalidRequest, NotFound
from voicefleet.metrics import Metrics
from voicefleet.protocol import tokens

log = logging.getLogger("voicefleet.dispatch")


@dataclass(frozen=True)
class InstanceView:
    """What the dispatcher sees of one instance (the worker(s) its credentials name)."""

    registered: bool = False  # a worker of it registered and is not gone
    connected: bool = False  # ...and its connection is up
    sessions: int = 0  # jobs assigned to its workers and not ended
    load: float = 0.0  # as its connected worker last reported
    accepting: bool = False  # connected and not draining (a full worker still counts)


@dataclass(frozen=True)
class Overflow:
    """Sessions routed to `routed` that `served` took because `routed` had no free worker."""

    routed: str
    served: str
    sessions: int


class DispatchService:
    def __init__(self, project: Project, settings: DispatchSettings, metrics: Metrics) -> None:
        self.project = project
        self.settings = settings
        self.metrics = metrics
        self.registry = Registry()
        self.book = JobBook(settings.finished_jobs_in_memory)
        self.routing = RoutingTable()
        self.scheduler = Scheduler(
            self.registry, self.book, project, settings, metrics, self.routing
        )
        self.book.job_listeners.append(self._count_job)
        self.stats = VersionStats()
        self.book.job_listeners.append(self.stats.job_changed)
        # Writes every change so far to the store (the history recorder's flush, set by the
        # server): CreateDispatch awaits it before it answers (see `stored`).
        self._commit: Callable[[], Awaitable[None]] | None = None
        # Set when this server stops: workers then lose their connection because of us, not
        # because they died, so their jobs stay running in the store for the next start.
        self.closing = False
        # Jobs that were running when the server last stopped, by adoption deadline.
        metrics.gauge(
            "voicefleet_workers",
            "Connected workers by status.",
            "status",
            lambda: {str(k): v for k, v in self.registry.counts().items()},
        )
        metrics.gauge(
            "voicefleet_jobs",
            "Jobs held in memory by state (live jobs and recently ended ones).",
            "state",
            lambda: {str(k): v for k, v in self.book.counts().items()},
        )
        metrics.gauge(
            "voicefleet_queued_jobs",
            "Jobs waiting for an available worker, by agent name; names no worker registered "
            'with and no routing entry has are summed under agent_name="(unknown)".',
            "agent_name",
            self.scheduler.queued_by_label,
        )

    def secret_for(self, api_key: str) -> str | None:
        """The secret of the project's key, or of an instance key derived from it."""
        if api_key == self.project.api_key:
            return self.project.api_secret
        if tokens.instance_identity(api_key) is not None:
            return tokens.instance_secret(self.project.api_secret, api_key)
        return None

    # -- the facade: what the layers above ask of the dispatcher -------------------------------

    def set_weights(
        self, agent_name: str, weights: Mapping[str, float] | None, deployment: str = ""
    ) -> None:
        """Route new sessions of (agent, deployment) by version weight (see `routing`)."""
        self.routing.set_weights(agent_name, weights, deployment)

    def on_weights_change(self, listener: Callable[[str], None]) -> None:
        """Call `listener(agent_name)` when the agent's routing weights are set."""
        self.routing.on_change(listener)

    def weights(self, agent_name: str, deployment: str = "") -> dict[str, float] | None:
        return self.routing.weights(agent_name, deployment)

    def routes(self) -> dict[str, dict[str, float]]:
        """Every routing entry: `agent_name/deployment` -> {version: weight}."""
        return self.routing.snapshot()

    def workers(self) -> list[Worker]:
        return list(self.registry.workers.values())

    def _workers_of(self, instance_id: str) -> list[Worker]:
        return [w for w in self.registry.workers.values() if w.identity.instance == instance_id]

    def instance(self, instance_id: str) -> InstanceView:
        return _view(self._workers_of(instance_id))

    def instances(self) -> dict[str, InstanceView]:
        """Every instance with a worker here, by instance id (one pass over the workers)."""
        by_instance: dict[str, list[Worker]] = {}
        for w in self.registry.workers.values():
            if w.identity.instance:
                by_instance.setdefault(w.identity.instance, []).append(w)
        return {i: _view(ws) for i, ws in by_instance.items()}

    def open_jobs(self) -> list[Job]:
        """Jobs not ended: waiting for a worker, assigned or running."""
        return [j for j in self.book.jobs.values() if not j.ended]

    @property
    def default_deployment(self) -> str:
        """The deployment of dispatches that name none."""
        return self.routing.default_deployment

    def drain_instance(self, instance_id: str) -> None:
        """The instance's workers are offered no more jobs; their sessions go on."""
        for worker in self._workers_of(instance_id):
            self.registry.drain(worker)

    def queued_by_agent(self) -> dict[str, int]:
        """Jobs waiting for a worker, by agent name."""
        return self.scheduler.queued_by_agent()

    def on_queued(self, listener: Callable[[str], None]) -> None:
        """Call `listener(agent_name)` when a job starts waiting for a worker."""
        self.scheduler.on_queued(listener)

    def overflow(self, agent_name: str) -> list[Overflow]:
        return [
            Overflow(routed, served, n)
            for (name, routed, served), n in self.scheduler.overflow.items()
            if name == agent_name
        ]

    def on_store(self, commit: Callable[[], Awaitable[None]]) -> None:
        """`commit()` returns once every job and dispatch change made so far is stored."""
        self._commit = commit

    async def stored(self) -> None:
        """Return once every change made so far is in the store: a dispatch is answered only
        then, so that a caller never holds the id of a job that a crash of this server (no
        shutdown, before the history's next batch) would lose. Concurrent callers share one
        write (the recorder writes whatever is pending under one lock). If the store fails, the
        dispatch is answered all the same: its job is placed already and runs, and the recorder
        writes it with its next batch."""
        if self._commit is None:
            return
        try:
            await self._commit()
        except Exception as e:
            log.warning("dispatch answered before it was stored: %s", e)

    def on_job_change(self, listener: JobListener) -> None:
        self.book.job_listeners.append(listener)

    def on_dispatch_change(self, listener: DispatchListener) -> None:
        self.book.dispatch_listeners.append(listener)

    def window(
        self, agent_name: str, version: str, since: float, jobs: Collection[str] | None = None
    ) -> Window:
        """What the version's jobs did since `since` (see `VersionStats.window`)."""
        return self.stats.window(agent_name, version, since, jobs)

    def over_time(
        self, agent_name: str, version: str, since: float, until: float, points: int
    ) -> list[tuple[float, float, float]]:
        """(moment, failure rate, median start delay) of `window(since)` as it was at `points`
        moments up to `until` (see `VersionStats.over_time`)."""
        return self.stats.over_time(agent_name, version, since, until, points)

    def log_errors(self, agent_name: str, version: str, job_id: str, kind: str, count: int) -> None:
        """A session of the version logged `count` ERROR lines of this `kind` (its judges count
        them; see `VersionStats.log_errors`)."""
        self.stats.log_errors(agent_name, version, job_id, kind, count)

    def pinned_dispatch(
        self, *, agent_name: str, room: str, metadata: str, deployment: str, version: str
    ) -> tuple[Dispatch, Job]:
        """A dispatch whose one job only workers of `version` may take (smoke tests)."""
        dispatch = self.create_dispatch(
            agent_name=agent_name,
            room=room,
            metadata=metadata,
            deployment=deployment,
            pin_version=version,
            # A smoke session whose worker dies fails the smoke test; never a second try.
            restart_policy=agent_dispatch.JobRestartPolicy.JRP_NEVER,
        )
        return dispatch, self.book.jobs[dispatch.job_ids[0]]

    async def run_expiry(self) -> None:
        """Fail queued jobs that waited past the queue timeout; runs until cancelled."""
        await self.scheduler.run_expiry()

    async def close(self) -> None:
        """Stop the offers and timers in flight (the server is stopping)."""
        await self.scheduler.close()

    def _count_job(self, job: Job, previous: JobState | None) -> None:
        if previous == job.state:
            return
        self.metrics.jobs_total.labels(str(job.state)).inc()
        if job.ended:
            log.info(
                "job ended",
                extra={"job": job.id, "state": str(job.state), "error": job.error},
            )

    # -- explicit dispatch (AgentDispatchService) ---------------------------------------------

    def create_dispatch(
        self,
        *,
        agent_name: str,
        room: str,
        metadata: str = "",
        attributes: Mapping[str, str] | None = None,
        deployment: str = "",
        room_sid: str = "",
        pin_version: str = "",
        restart_policy: int = agent_dispatch.JobRestartPolicy.JRP_ON_FAILURE,
    ) -> Dispatch:
        if not room:
            raise InvalidRequest("room is required")
        dispatch = Dispatch(
            id=new_id("AD_"),
            agent_name=agent_name,
            room=room,
            metadata=metadata,
            attributes=dict(attributes or {}),
            deployment=deployment,
            restart_policy=restart_policy,
        )
        job = Job(
            id=new_id("AJ_"),
            dispatch_id=dispatch.id,
            agent_name=agent_name,
            room=room,
            room_sid=room_sid or self._room_sid(room),
            metadata=metadata,
            attributes=dict(dispatch.attributes),
            deployment=deployment,
            pin_version=pin_version,
            restart_policy=restart_policy,
        )
        self.scheduler.submit(job)  # raises NoCapacity before anything is recorded
        # The job is in the book; record the dispatch that owns it.
        self.book.add_dispatch(dispatch)
        dispatch.job_ids.append(job.id)
        log.info(
            "dispatch created",
            extra={"dispatch": dispatch.id, "agent_name": agent_name, "room": room},
        )
        return dispatch

    def _room_sid(self, room: str) -> str:
        for d in self.book.in_room(room):
            for job_id in d.job_ids:
                job = self.book.jobs.get(job_id)
                if job is not None:
                    return job.room_sid
        return new_id("RM_")

    def list_dispatches(self, room: str, dispatch_id: str = "") -> list[Dispatch]:
        found = self.book.in_room(room)
        if dispatch_id:
            found = [d for d in found if d.id == dispatch_id]
        return found

    def delete_dispatch(self, dispatch_id: str, room: str) -> Dispatch:
        dispatch = self.book.dispatches.get(dispatch_id)
        if dispatch is None or dispatch.room != room or dispatch.deleted_at:
            raise NotFound(f"no dispatch '{dispatch_id}' in room '{room}'")
        for job_id in dispatch.job_ids:
            job = self.book.jobs.get(job_id)
            if job is not None and job.state not in ENDED:
                self.scheduler.terminate(job, f"dispatch {dispatch_id} deleted")
        self.book.delete_dispatch(dispatch)
        log.info("dispatch deleted", extra={"dispatch": dispatch_id, "room": room})
        return dispatch

    # -- restart ------------------------------------------------------------------------------

    def restore(self, dispatches: list[Dispatch], jobs: list[Job], adopt_within: float) -> None:
        """Take back what the last run left open: queue pending jobs again; running jobs wait
        `adopt_within` seconds for their worker to reconnect and report them, then fail."""
        for dispatch in dispatches:
            self.book.add_dispatch(dispatch, record=False)
        now = time.time()
        for job in jobs:
            job.worker_id = ""
            self.book.jobs[job.id] = job
            owner = self.book.dispatches.get(job.dispatch_id)
            if owner is not None:
                owner.job_ids.append(job.id)
            if job.state == JobState.PENDING:
                job.queued_at = max(job.created_at, now - self.settings.queue_timeout / 2)
                self.scheduler.requeue(job)
            else:
                self.scheduler.orphan(
                    job,
                    adopt_within,
                    "voicefleet restarted and no worker reported this job after reconnecting",
                    redispatch=False,
                )
        if jobs:
            log.info("restored open jobs", extra={"jobs": len(jobs)})

    def instance_exited(self, instance: str, *, redispatch: bool) -> None:
        """The process of an instance ended: sessions its worker left go to other workers now
        (`redispatch`: it died), or end with it (it was stopped)."""
        self.scheduler.instance_exited(instance, redispatch=redispatch)

    # -- gateway mode: jobs a LiveKit server offers voicefleet as its worker -------------------

    def on_worker_registered(self, listener: Callable[[Worker], None]) -> None:
        """Call `listener(worker)` when a worker registers (its pool key, its permissions)."""
        self.registry.on_register(listener)

    def on_pool_change(self, listener: Callable[[PoolKey], None]) -> None:
        """Call `listener(key)` when a worker of pool `key` comes, goes or reports its status."""
        self.registry.on_change(listener)

    def pool_load(self, key: PoolKey) -> PoolLoad:
        """The pool's share of capacity in use, whether it can take a job, its jobs."""
        return self.registry.pool_load(key)

    def relay_job(self, upstream: Upstream) -> Job:
        """Place the job a LiveKit server offered (`upstream.offer`) as any other job: the
        routing table, the queue, the next worker on refusal. Its room token is the LiveKit
        server's (see `Upstream`). Raises NoCapacity as `CreateDispatch` would."""
        offer = upstream.offer
        job = Job(
            id=offer.id,
            dispatch_id=offer.dispatch_id,
            agent_name=offer.agent_name,
            room=offer.room.name,
            room_sid=offer.room.sid,
            namespace=offer.namespace,
            job_type=offer.type,
            metadata=offer.metadata,
            attributes=dict(offer.attributes),
            deployment=offer.deployment,
            upstream=upstream,
        )
        self.scheduler.submit(job)
        log.info(
            "job relayed from LiveKit",
            extra={"job": job.id, "agent_name": job.agent_name, "room": job.room},
        )
        return job

    def end_job(self, job: Job, reason: str) -> None:
        """End `job` for good (its worker gets a JobTermination), e.g. LiveKit terminated it."""
        if not job.ended:
            self.scheduler.terminate(job, reason)


def _view(workers: list[Worker]) -> InstanceView:
    if not workers:
        return InstanceView()
    connected = [w for w in workers if w.connected]
    return InstanceView(
        registered=True,
        connected=bool(connected),
        sessions=sum(len(w.jobs) for w in workers),
        load=connected[-1].load if connected else 0.0,
        accepting=any(not w.draining for w in connected),
    )
