"""The choice of worker for each job, and nothing else.

As LiveKit's server does: a job goes only to workers registered for its agent name, namespace
and job type; the server sends an availability request and waits up to `availability_timeout`
for the answer; a refusal (or here also a timeout, or the worker vanishing) moves the job to the
next worker. Workers are taken round robin among those available. A job that finds no available
worker waits in a FIFO queue until one is, or fails after `queue_timeout`; the queue is bounded
in all, per room and per agent name, so that no one caller can take it from the others.

A job a LiveKit server offered voicefleet (gateway mode) is placed the same way; only the step
after a worker accepts differs: its `Job.upstream` link answers LiveKit and returns LiveKit's
url and room token, which the worker gets instead of a token minted here (see jobs.Upstream).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Collection, Coroutine, Sequence
from typing import Any

from livekit.protocol import agent, agent_dispatch

from voicefleet.config import DispatchSettings, Project
from voicefleet.dispatch.jobs import Job, JobBook, JobState, PendingCounts, RoomGrant
from voicefleet.dispatch.registry import PoolKey, Registry, Worker
from voicefleet.dispatch.routing import RoutingTable
from voicefleet.errors import NoCapacity
from voicefleet.metrics import Metrics
from voicefleet.protocol.tokens import mint_room_token

log = logging.getLogger("voicefleet.dispatch")

ATTRIBUTE_AGENT_NAME = "lk.agent_name"
# The metric label value of every agent name that is not a known agent's (see agent_label).
UNKNOWN_AGENT = "(unknown)"
# A caller's room or agent name quoted in an error: enough to recognise it, bounded.
SHOWN_NAME = 100


class WorkerGone(Exception):
    pass


def pick_worker(
    pool: Sequence[Worker],
    cursor: int,
    exclude: Collection[str],
    versions: Collection[str] | None = None,
    deployment: str | None = None,
) -> tuple[Worker | None, int]:
    """The next available worker at or after `cursor` (round robin), and the cursor after it.

    `versions`, when given, limits the choice to workers of those versions, and `deployment`
    to workers of that deployment (a worker that names none belongs to every one).
    """
    n = len(pool)
    for i in range(n):
        worker = pool[(cursor + i) % n]
        if (
            worker.available
            and worker.id not in exclude
            and (versions is None or worker.pool in versions)
            and (deployment is None or worker.deployment in (deployment, ""))
        ):
            return worker, (cursor + i + 1) % n
    return None, cursor


def job_key(job: Job) -> PoolKey:
    return PoolKey(job.agent_name, job.namespace, job.job_type)


class Scheduler:
    def __init__(
        self,
        registry: Registry,
        book: JobBook,
        project: Project,
        settings: DispatchSettings,
        metrics: Metrics,
        routing: RoutingTable,
    ) -> None:
        self.registry = registry
        self.routing = routing
        self.book = book
        self.project = project
        self.settings = settings
        self.metrics = metrics
        self._cursor: dict[PoolKey, int] = {}
        self._waiting: dict[PoolKey, deque[Job]] = {}
        self._wake: dict[PoolKey, asyncio.Event] = {}
        self._pumps: dict[PoolKey, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        # Overflows by (agent name, routed version, serving version): counted, not hidden;
        # once the job is placed (running, or ended where it was assigned), not when assigned:
        # a job taken back from a worker that did not start it may run on its routed version.
        self.overflow: dict[tuple[str, str, str], int] = {}
        book.job_listeners.append(self._count_overflow)
        self._queued_listeners: list[Callable[[str], None]] = []
        # Jobs waiting for a worker, by room and by agent: the queue's quotas, checked in O(1).
        self.pending = PendingCounts()
        book.job_listeners.append(self.pending.job_changed)
        # Agent names with a routing entry (of any deployment): known agents, for metric labels.
        self._routed: set[str] = set()
        # Jobs whose worker went away mid-session, waiting for it to come back and say it still
        # runs them (its connection dropped, or this server restarted), each with its timer.
        self._orphans: dict[str, tuple[asyncio.TimerHandle, Callable[[], None]]] = {}
        registry.on_capacity(self._on_capacity)
        routing.on_change(self._on_route)

    def on_queued(self, listener: Callable[[str], None]) -> None:
        """Call `listener(agent_name)` when a job starts waiting for a worker (autoscaler)."""
        self._queued_listeners.append(listener)

    def queued_by_agent(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for key, waiting in self._waiting.items():
            out[key.agent_name] = out.get(key.agent_name, 0) + len(waiting)
        return out

    def queued_by_label(self) -> dict[str, int]:
        """`queued_by_agent`, by metric label value: unknown agents' names summed under one."""
        out: dict[str, int] = {}
        for name, n in self.queued_by_agent().items():
            label = self.agent_label(name)
            out[label] = out.get(label, 0) + n
        return out

    def agent_label(self, agent_name: str) -> str:
        """`agent_name` as a metric label value.

        Callers choose the agent names they dispatch to: any length, any characters, as many as
        they like. Each would be a series of its own, and a NUL or a 10,000-character name in
        /metrics breaks scrapers. So only known agents' names become labels: one a worker
        registered with, or one with a routing entry (set by the control plane)."""
        if self.registry.knows(agent_name) or agent_name in self._routed:
            return agent_name
        return UNKNOWN_AGENT

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    # -- entry points -------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Take a new job: offer it now, or queue it. Raises NoCapacity, naming the quota, when
        the queue, the job's room or its agent has as many jobs waiting as it may."""
        self._admit(job)
        self.book.add_job(job)
        self.requeue(job)

    def _admit(self, job: Job) -> None:
        # Per room: a token scoped to one room may dispatch into it at will. Per agent: an agent
        # whose workers are all busy or gone. Neither can then take the queue from the others.
        s, pending = self.settings, self.pending
        if pending.total >= s.queue_limit:
            raise NoCapacity(f"dispatch queue is full ({s.queue_limit} jobs wait for a worker)")
        if pending.in_room(job.room) >= s.queue_limit_per_room:
            raise NoCapacity(
                f"room {_shown(job.room)} is at its queue quota: {s.queue_limit_per_room} jobs "
                "wait for a worker there (--queue-limit-per-room)"
            )
        if pending.for_agent(job.agent_name) >= s.agent_queue_limit:
            raise NoCapacity(
                f"agent {_shown(job.agent_name)} is at its queue quota: {s.agent_queue_limit} "
                "jobs wait for its workers (--queue-limit-per-agent)"
            )

    def requeue(self, job: Job) -> None:
        """(Re)start dispatching a job already in the book."""
        # Counted against the quotas from now on if it was not yet: a job restored after a
        # restart is put in the book without passing through add_job.
        self.pending.job_changed(job)
        key = job_key(job)
        waiting = self._waiting.get(key)
        if waiting:
            # In creation order: a job back from a worker that did not start it, or whose
            # worker died, goes ahead of the jobs created after it, as a refused one does.
            _enqueue(waiting, job)
            if self._pick(key, job) is not None:
                # A worker is free for it: the queue's pass gives that worker to the first
                # waiting job that can take it, this one if those before it cannot.
                self._on_capacity(key)
        else:
            self._dispatch(job)

    def job_update(self, worker: Worker, update: agent.UpdateJobStatus) -> None:
        worker.reports_jobs = True
        job = self.book.jobs.get(update.job_id)
        if (
            job is not None
            and not job.worker_id
            and job.state in (JobState.ASSIGNED, JobState.RUNNING)
            and job.agent_name == worker.key.agent_name
        ):
            # Restored after a restart, not re-adopted yet: livekit-agents sends the updates it
            # queued while the server was down (a call that ended meanwhile) before migrate_job.
            self.adopt(worker, [job.id])
        if (
            job is not None
            and job.state == JobState.PENDING
            and worker.id in job.not_started_by
            and update.status == agent.JobStatus.JS_RUNNING
        ):
            # Slow, not gone: the start timeout took the job back and no other worker has it
            # yet. The caller is better served by the agent that is already starting.
            log.info("job started late; its worker keeps it", extra={"job": job.id})
            self._hold(job, worker)
        if job is None or job.worker_id != worker.id:
            log.debug("update for a job this worker does not hold", extra={"job": update.job_id})
            if job is not None and update.status == agent.JobStatus.JS_RUNNING:
                # It started after all, too late: the job went to another worker. Stop this
                # copy, or the room would get two agents.
                worker.send(agent.ServerMessage(termination=agent.JobTermination(job_id=job.id)))
            return
        if update.status == agent.JobStatus.JS_RUNNING:
            self.book.transition(job, JobState.RUNNING)
            return
        if update.status == agent.JobStatus.JS_SUCCESS:
            self.book.transition(job, JobState.SUCCEEDED)
        elif update.status == agent.JobStatus.JS_FAILED:
            self.book.transition(job, JobState.FAILED, update.error or "the agent's job failed")
        elif update.status == agent.JobStatus.JS_CANCELLED:
            self.book.transition(job, JobState.TERMINATED, update.error or "cancelled by worker")
        else:
            return
        worker.jobs.discard(job.id)
        self.registry.job_ended(worker)

    def worker_gone(self, worker: Worker, reason: str) -> None:
        """A worker's connection ended: its offers move on; its jobs wait `redispatch_grace`
        for it to reconnect and say it runs them, then go to another worker (JRP_ON_FAILURE)
        or fail with `reason` (JRP_NEVER, or a worker that reports no job status)."""
        self.registry.remove(worker)
        for fut in worker.offers.values():
            if not fut.done():
                fut.set_exception(WorkerGone(reason))
        for job_id in sorted(worker.jobs):
            job = self.book.jobs.get(job_id)
            if job is not None and not job.ended:
                why = f"worker {worker.id} {reason} while the job was {job.state}"
                job.worker_id = ""
                self.book.touch(job)
                # A worker that never reports how its jobs go (Node's @livekit/agents 1.9) may
                # have ended this one long ago: starting it again could call a caller back.
                self.orphan(
                    job, self.settings.redispatch_grace, why, redispatch=worker.reports_jobs
                )
        worker.jobs.clear()

    def orphan(self, job: Job, within: float, reason: str, *, redispatch: bool) -> None:
        """`job` runs on no worker known here: wait `within` seconds for one to report it (a
        migrate_job or a status update after it reconnects), then dispatch it again if
        `redispatch` and its restart policy allow, else fail it with `reason`."""
        old = self._orphans.pop(job.id, None)
        if old is not None:
            old[0].cancel()

        def unclaimed() -> None:
            self._unclaimed(job, reason, redispatch)

        timer = asyncio.get_running_loop().call_later(within, unclaimed)
        self._orphans[job.id] = (timer, unclaimed)

    def instance_exited(self, instance: str, *, redispatch: bool) -> None:
        """The process of `instance` ended: jobs its worker left will not be claimed back, so
        they move on now, not after the grace: to another worker if `redispatch` (it died),
        else they fail (it was stopped: drained, or killed at the end of its grace period)."""
        for job_id, (timer, unclaimed) in list(self._orphans.items()):
            job = self.book.jobs.get(job_id)
            if job is None or job.instance != instance or job.worker_id:
                continue
            timer.cancel()
            if redispatch:
                unclaimed()
            else:
                del self._orphans[job_id]
                self.book.transition(
                    job, JobState.FAILED, f"instance {instance} was stopped while the job ran"
                )

    def _unclaimed(self, job: Job, reason: str, redispatch: bool) -> None:
        self._orphans.pop(job.id, None)
        if job.ended or job.worker_id:
            return  # ended meanwhile, or adopted by a worker that reconnected
        if not redispatch or job.restart_policy == agent_dispatch.JobRestartPolicy.JRP_NEVER:
            self.book.transition(job, JobState.FAILED, reason)
            return
        log.warning("job dispatched again: %s", reason, extra={"job": job.id})
        self.metrics.redispatches.inc()
        job.redispatches += 1
        job.redispatched_for = reason
        job.tried.clear()
        job.not_started_by.clear()
        self.book.transition(job, JobState.PENDING)  # listeners see the version it ran on
        job.agent_id = job.version = job.instance = ""
        self.requeue(job)

    def adopt(self, worker: Worker, job_ids: Sequence[str]) -> None:
        """A worker reports jobs it runs (after a reconnect, e.g. when this server restarted)."""
        for job_id in job_ids:
            job = self.book.jobs.get(job_id)
            if job is None or job.ended or job.agent_name != worker.key.agent_name:
                continue
            holder = self.registry.workers.get(job.worker_id) if job.worker_id else None
            if holder is not None and holder is not worker and holder.connected:
                continue  # another live worker has it
            if job.state == JobState.PENDING:
                self._hold(job, worker)  # taken back by the start timeout, yet it runs here
            else:
                job.worker_id = worker.id
                worker.jobs.add(job_id)
                self.book.touch(job)
            log.info("job re-adopted", extra={"job": job_id, "worker": worker.id})

    def terminate(self, job: Job, reason: str) -> None:
        """End a job for good: tell its worker (JobTermination) and never dispatch it again."""
        worker = self.registry.workers.get(job.worker_id) if job.worker_id else None
        if worker is not None and job.state in (JobState.ASSIGNED, JobState.RUNNING):
            worker.send(agent.ServerMessage(termination=agent.JobTermination(job_id=job.id)))
            worker.jobs.discard(job.id)
        self.book.transition(job, JobState.TERMINATED, reason)

    def expire_queued(self, now: float | None = None) -> int:
        """Fail jobs that waited longer than `queue_timeout`; return how many."""
        now = time.time() if now is None else now
        limit = self.settings.queue_timeout
        expired = 0
        for key, waiting in self._waiting.items():
            keep: deque[Job] = deque()
            for job in waiting:
                if job.state != JobState.PENDING:
                    continue  # ended, or taken back by a worker that started it late
                if now - job.queued_at < limit:
                    keep.append(job)
                    continue
                expired += 1
                why = self._no_worker_reason(key, limit)
                if job.redispatched_for:
                    why = f"{job.redispatched_for}; dispatched again, {why}"
                self.book.transition(job, JobState.FAILED, why)
            waiting.clear()
            waiting.extend(keep)
            if not waiting:
                self._wake[key].set()  # let the pool's pump see the empty queue and end
        return expired

    async def run_expiry(self, interval: float = 0.5) -> None:
        while True:
            await asyncio.sleep(interval)
            self.expire_queued()

    async def close(self) -> None:
        for timer, _ in self._orphans.values():
            timer.cancel()
        tasks = [*self._tasks, *self._pumps.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- dispatching --------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _pick(self, key: PoolKey, job: Job) -> Worker | None:
        """The next worker for `job`: of its routed version, else of another routed version."""
        pool = self.registry.pools.get(key, ())
        cursor = self._cursor.get(key, 0)
        # Never again the worker that did not start it in time: it may still be starting it.
        skip = job.tried | job.not_started_by if job.not_started_by else job.tried
        # Versions are routed per deployment: staging's v2 instances are not production's.
        dep = job.deployment or self.routing.default_deployment
        if job.pin_version:
            worker, self._cursor[key] = pick_worker(pool, cursor, skip, (job.pin_version,), dep)
            return worker
        route = self.routing.choose(key.agent_name, job.deployment, job.dispatch_id or job.room)
        if route is None:
            worker, self._cursor[key] = pick_worker(pool, cursor, skip)
            return worker
        job.routed_version = route.version
        worker, cursor = pick_worker(pool, cursor, skip, (route.version,), dep)
        if worker is None and route.others:
            worker, cursor = pick_worker(pool, cursor, skip, route.others, dep)
        self._cursor[key] = cursor
        return worker

    def _dispatch(self, job: Job, worker: Worker | None = None) -> None:
        """Offer `job` to `worker`, else to the next worker it may go to, else queue it.

        The availability request goes to the worker's connection now, in the caller's turn of
        the event loop (from a task started for it, it would go a turn later); its answer is
        awaited in a task, which dispatches the job again when the worker declines it."""
        key = job_key(job)
        while not job.ended and job.state == JobState.PENDING:
            worker = worker or self._pick(key, job)
            if worker is None:
                self._park(key, job)
                return
            if worker.connected:
                fut: asyncio.Future[agent.AvailabilityResponse] = (
                    asyncio.get_running_loop().create_future()
                )
                worker.offers[job.id] = fut
                request = agent.AvailabilityRequest(job=job.to_proto())
                worker.send(agent.ServerMessage(availability=request))
                self._spawn(self._answered(job, worker, fut))
                return
            # Gone since it was picked: its disconnect has been handled.
            if self._declined(job, worker, "worker_gone"):
                return
            worker = None

    async def _answered(
        self, job: Job, worker: Worker, fut: asyncio.Future[agent.AvailabilityResponse]
    ) -> None:
        """The task that waits for the worker's answer to the offer `_dispatch` sent."""
        if not await self._offer(job, worker, fut):
            self._dispatch(job)  # declined: the next worker

    async def _offer(
        self, job: Job, worker: Worker, fut: asyncio.Future[agent.AvailabilityResponse]
    ) -> bool:
        """The answer to the offer of `job` sent to `worker`, acted on; True once the job is no
        longer waiting for a worker."""
        try:
            # Not wait_for: it costs a loop turn more between the answer and what follows it.
            async with asyncio.timeout(self.settings.availability_timeout):
                answer = await fut
        except TimeoutError:
            return self._declined(job, worker, "timeout")
        except WorkerGone:
            return self._declined(job, worker, "worker_gone")
        finally:
            worker.offers.pop(job.id, None)
        if job.ended or job.state != JobState.PENDING:
            return True  # deleted, or taken back by a slow worker, while this one thought it over
        if answer.terminate:
            self.book.transition(job, JobState.TERMINATED, f"worker {worker.id} ended the job")
            return True
        if not answer.available:
            return self._declined(job, worker, "refused")
        if not worker.connected:
            return self._declined(job, worker, "worker_gone")
        grant = None
        if job.upstream is not None:
            # Gateway mode: the LiveKit server that offered the job assigns it, with its own
            # room token; this worker holds its acceptance open meanwhile (milliseconds).
            grant = await job.upstream.accepted(job, answer)
            if job.ended or job.state != JobState.PENDING:
                return True
            if grant is None:
                self.book.transition(job, JobState.TERMINATED, "LiveKit did not assign the job")
                return True
            if not worker.connected:
                return self._declined(job, worker, "worker_gone")
        self._assign(job, worker, answer, grant)
        return True

    def _declined(self, job: Job, worker: Worker, outcome: str) -> bool:
        self.metrics.offers.labels(outcome).inc()
        job.tried.add(worker.id)
        log.info(
            "offer declined",
            extra={"job": job.id, "worker": worker.id, "outcome": outcome},
        )
        return job.ended

    def _assign(
        self,
        job: Job,
        worker: Worker,
        answer: agent.AvailabilityResponse,
        grant: RoomGrant | None = None,
    ) -> None:
        """Give `job` to `worker`: its room token is `grant`'s (gateway mode) or minted here."""
        grant = grant or self._room_grant(job, worker, answer)
        job.participant_identity = answer.participant_identity
        self._hold(job, worker)
        worker.send(
            agent.ServerMessage(
                assignment=agent.JobAssignment(job=job.to_proto(), url=grant.url, token=grant.token)
            )
        )
        self.metrics.offers.labels("accepted").inc()
        asyncio.get_running_loop().call_later(
            self.settings.start_timeout, self._check_started, job, worker
        )
        if job.routed_version and job.routed_version != worker.pool:
            log.info(
                "routed version full, overflow",
                extra={"job": job.id, "routed": job.routed_version, "served": worker.pool},
            )
        self.metrics.dispatch_latency.observe(job.assigned_at - job.queued_at)
        # Said in the loop's next turn, once the worker's connection has sent the assignment:
        # a log line formatted and written to stderr costs tens of microseconds.
        asyncio.get_running_loop().call_soon(
            functools.partial(
                log.info,
                "job assigned",
                extra={"job": job.id, "worker": worker.id, "room": job.room, "pool": worker.pool},
            )
        )

    def _count_overflow(self, job: Job, previous: JobState | None) -> None:
        """A job leaving ASSIGNED other than back to the queue was served by its worker's
        version: an overflow if that is not the version it was routed to."""
        if previous != JobState.ASSIGNED or job.state in (JobState.ASSIGNED, JobState.PENDING):
            return
        if not job.routed_version or not job.version or job.routed_version == job.version:
            return
        k = (job.agent_name, job.routed_version, job.version)
        self.overflow[k] = self.overflow.get(k, 0) + 1
        self.metrics.routing_overflow.labels(
            self.agent_label(job.agent_name), job.routed_version, job.version
        ).inc()

    def _room_grant(
        self, job: Job, worker: Worker, answer: agent.AvailabilityResponse
    ) -> RoomGrant:
        """The SFU url and a room token for the identity the worker chose (standalone mode)."""
        attributes = dict(answer.participant_attributes)
        attributes[ATTRIBUTE_AGENT_NAME] = worker.key.agent_name
        key, secret = self.project.room_token_key
        p = worker.permissions
        token = mint_room_token(
            key,
            secret,
            room=job.room,
            identity=answer.participant_identity,
            name=answer.participant_name,
            metadata=answer.participant_metadata,
            attributes=attributes,
            permissions={
                "canPublish": p.can_publish,
                "canSubscribe": p.can_subscribe,
                "canPublishData": p.can_publish_data,
                "canUpdateOwnMetadata": p.can_update_metadata,
                "hidden": p.hidden,
            },
        )
        return RoomGrant(self.project.livekit_url, token)

    def _hold(self, job: Job, worker: Worker) -> None:
        """`worker` has `job` now."""
        job.worker_id = worker.id
        job.agent_id = worker.identity.agent
        job.version = worker.pool
        job.instance = worker.identity.instance
        self.book.transition(job, JobState.ASSIGNED)
        worker.jobs.add(job.id)

    def _check_started(self, job: Job, worker: Worker) -> None:
        """A job still assigned to `worker` that it never started goes to the next worker."""
        if job.state != JobState.ASSIGNED or job.worker_id != worker.id:
            return
        if not worker.reports_jobs:
            # A worker that never said how any job went (Node's @livekit/agents 1.9 sends no
            # job status at all) is not known to have dropped this one: taking it back would
            # put a second agent in the room. LiveKit's server leaves such jobs with their
            # worker too; the job ends when the worker goes.
            log.info(
                "job not reported started by a worker that reports no job status; it stays",
                extra={"job": job.id, "worker": worker.id},
            )
            return
        log.warning(
            "job not started in time, offering it to the next worker",
            extra={"job": job.id, "worker": worker.id, "timeout": self.settings.start_timeout},
        )
        self.metrics.offers.labels("not_started").inc()
        worker.jobs.discard(job.id)
        self.registry.job_ended(worker)
        job.tried.add(worker.id)
        job.not_started_by.add(worker.id)  # it keeps the job if it starts it before another does
        self.book.transition(job, JobState.PENDING)  # listeners see the version that failed it
        job.worker_id = job.agent_id = job.version = job.instance = ""
        self.requeue(job)

    # -- the queue ----------------------------------------------------------------------------

    def _park(self, key: PoolKey, job: Job) -> None:
        waiting = self._waiting.setdefault(key, deque())
        _enqueue(waiting, job)
        for listener in self._queued_listeners:
            listener(key.agent_name)
        if key not in self._pumps:
            self._wake.setdefault(key, asyncio.Event())
            self._pumps[key] = asyncio.create_task(self._pump(key))

    def _on_capacity(self, key: PoolKey) -> None:
        wake = self._wake.get(key)
        if wake is not None:
            wake.set()

    def _on_route(self, agent_name: str) -> None:
        if self._has_route(agent_name):
            self._routed.add(agent_name)
        else:
            self._routed.discard(agent_name)
        for key in self._wake:
            if key.agent_name == agent_name:
                self._on_capacity(key)

    async def _pump(self, key: PoolKey) -> None:
        """Hand waiting jobs of one pool to workers in FIFO order as workers become available."""
        waiting = self._waiting[key]
        wake = self._wake[key]
        try:
            while waiting:
                if self._place_one(key, waiting):
                    continue
                wake.clear()
                # A refusal can be passing (a worker counts offers it is still answering
                # against its load), so a refused job retries after a while even if no
                # worker's status changes.
                retry = self.settings.retry_interval if any(j.tried for j in waiting) else None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), retry)
                for parked in waiting:
                    parked.tried.clear()  # a new pass over the workers
        finally:
            del self._pumps[key]
            if not waiting:
                del self._waiting[key]
                del self._wake[key]

    def _place_one(self, key: PoolKey, waiting: deque[Job]) -> bool:
        """Hand the first waiting job some worker can take now to that worker; False if none.

        FIFO among jobs that want the same workers. A job that no worker can take (its pinned
        version, deployment or routed version has none free) holds up no job behind it that
        wants other workers: each such kind of job is tried once per pass."""
        stuck: set[tuple[str, str, str]] = set()
        for i, job in enumerate(waiting):
            if job.state != JobState.PENDING:
                del waiting[i]
                return True
            if (job.pin_version, job.deployment, job.routed_version) in stuck:
                continue
            worker = self._pick(key, job)
            if worker is None:
                if not job.tried and not job.not_started_by:
                    # Only a job any worker of its kind may take speaks for the jobs behind it:
                    # one that a worker did not start in time is never offered to that worker
                    # again, yet the next job may well go there.
                    stuck.add((job.pin_version, job.deployment, job.routed_version))
                continue
            del waiting[i]
            self._dispatch(job, worker)
            return True
        return False

    def _has_route(self, agent_name: str) -> bool:
        """Whether `agent_name` has a routing entry of any deployment (once per route change)."""
        # Snapshot keys are "name/deployment" and either part may hold a "/": confirm each
        # candidate split with the table itself.
        prefix = agent_name + "/"
        return any(
            key.startswith(prefix)
            and self.routing.weights(agent_name, key[len(prefix) :]) is not None
            for key in self.routing.snapshot()
        )

    def _no_worker_reason(self, key: PoolKey, waited: float) -> str:
        pool = self.registry.pools.get(key, [])
        name = key.agent_name or "(automatic dispatch, no agent_name)"
        if not pool:
            return f"no worker registered for agent '{name}' within {waited:g}s"
        states = ", ".join(f"{w.id}: {w.status}" for w in pool[:5])
        more = f" and {len(pool) - 5} more" if len(pool) > 5 else ""
        return (
            f"no worker for agent '{name}' took the job within {waited:g}s "
            f"({len(pool)} registered, none available or all refused: {states}{more})"
        )


def _enqueue(waiting: deque[Job], job: Job) -> None:
    """FIFO by creation: a job that came back (refused, not started in time, its worker gone)
    goes ahead of the jobs created after it."""
    if not waiting or waiting[-1].created_at <= job.created_at:
        waiting.append(job)  # a new job: the common case, O(1)
        return
    i = next((i for i, other in enumerate(waiting) if other.created_at > job.created_at), None)
    waiting.insert(len(waiting) if i is None else i, job)


def _shown(name: str) -> str:
    return repr(name if len(name) <= SHOWN_NAME else name[:SHOWN_NAME] + "…")
