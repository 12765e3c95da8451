"""Jobs and dispatches: the job state machine, held in memory on the hot path.

A dispatch (`AD_…`) asks for an agent in a room; it makes one job (`AJ_…`), one conversation
for one worker. Every change is handed to the listeners (the store's recorder, the metrics).
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from livekit.protocol import agent, agent_dispatch, models


class JobState(StrEnum):
    PENDING = "pending"
    ASSIGNED = "assigned"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TERMINATED = "terminated"


ENDED = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.TERMINATED})
_NEXT: dict[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset({JobState.ASSIGNED, *ENDED}),
    # Back to pending: the worker never started it (Scheduler's start timeout).
    JobState.ASSIGNED: frozenset({JobState.PENDING, JobState.RUNNING, *ENDED}),
    # Back to pending: its worker died and the job is dispatched again (JRP_ON_FAILURE).
    JobState.RUNNING: frozenset({JobState.PENDING, *ENDED}),
}

_PROTO_STATUS = {
    JobState.PENDING: agent.JobStatus.JS_PENDING,
    JobState.ASSIGNED: agent.JobStatus.JS_PENDING,
    JobState.RUNNING: agent.JobStatus.JS_RUNNING,
    JobState.SUCCEEDED: agent.JobStatus.JS_SUCCESS,
    JobState.FAILED: agent.JobStatus.JS_FAILED,
    JobState.TERMINATED: agent.JobStatus.JS_CANCELLED,
}


def new_id(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(9).replace("-", "x").replace("_", "y")


@dataclass(frozen=True)
class RoomGrant:
    """Where a job's agent joins its room, and the room token it joins with."""

    url: str
    token: str


class Upstream(Protocol):
    """The LiveKit server a job came from, in gateway mode: it offered the job to voicefleet as
    one of its workers, so it, not voicefleet, mints the room token once a worker here accepts.

    The scheduler places such a job as any other (routing table, queue, next worker on refusal);
    only the step after a worker accepts differs: `accepted` tells the LiveKit server and waits
    for its assignment, whose url and token the worker then gets unchanged. None: the LiveKit
    server will not assign it (it gave up, or the link to it is gone)."""

    @property
    def offer(self) -> agent.Job:
        """The job as the LiveKit server offered it (room, participant, state...)."""
        ...

    async def accepted(self, job: Job, answer: agent.AvailabilityResponse) -> RoomGrant | None:
        """A worker here accepted `job` with `answer`: the LiveKit server's url and token."""
        ...


@dataclass(eq=False)
class Job:
    id: str
    dispatch_id: str
    agent_name: str
    room: str
    room_sid: str
    namespace: str = ""
    job_type: int = agent.JobType.JT_ROOM
    metadata: str = ""
    attributes: dict[str, str] = field(default_factory=dict)
    deployment: str = ""
    state: JobState = JobState.PENDING
    error: str = ""
    worker_id: str = ""
    agent_id: str = ""
    version: str = ""
    instance: str = ""
    participant_identity: str = ""
    created_at: float = field(default_factory=time.time)
    assigned_at: float = 0.0
    started_at: float = 0.0
    ended_at: float = 0.0
    # LiveKit's JobRestartPolicy: JRP_ON_FAILURE (the default) dispatches the job again when
    # its worker dies mid-session; JRP_NEVER fails it.
    restart_policy: int = agent_dispatch.JobRestartPolicy.JRP_ON_FAILURE
    # Times it was dispatched again after its worker died, and why the last time (said again
    # if it then fails: a caller's session cut by a worker's death should say so).
    redispatches: int = 0
    redispatched_for: str = field(default="", repr=False)
    # When it last began waiting for a worker: the queue timeout counts from here.
    queued_at: float = field(default_factory=time.time)
    # The version the routing table chose for this session (served by another if it was full);
    # `pin_version` forces one (the smoke test's synthetic sessions).
    routed_version: str = ""
    pin_version: str = ""
    # Workers that refused or did not answer this job in the current dispatch pass.
    tried: set[str] = field(default_factory=set, repr=False)
    # Workers that accepted it and did not start it in time: never offered it again (one may
    # still be starting it), and one that starts it late keeps it if nobody else has it.
    not_started_by: set[str] = field(default_factory=set, repr=False)
    # Set when a LiveKit server offered this job to voicefleet (gateway mode); None otherwise.
    upstream: Upstream | None = field(default=None, repr=False)

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    def to_proto(self) -> agent.Job:
        if self.upstream is not None:
            # The LiveKit server's own job (room, participant...), with its state here.
            relayed = agent.Job()
            relayed.CopyFrom(self.upstream.offer)
            relayed.state.CopyFrom(self.state_proto())
            return relayed
        job = agent.Job(
            id=self.id,
            dispatch_id=self.dispatch_id,
            type=self.job_type,  # type: ignore[arg-type]
            room=models.Room(sid=self.room_sid, name=self.room),
            namespace=self.namespace,
            metadata=self.metadata,
            agent_name=self.agent_name,
            deployment=self.deployment,
            state=self.state_proto(),
        )
        job.attributes.update(self.attributes)
        return job

    def state_proto(self) -> agent.JobState:
        return agent.JobState(
            status=_PROTO_STATUS[self.state],
            error=self.error,
            started_at=int(self.assigned_at * 1e9),
            ended_at=int(self.ended_at * 1e9),
            updated_at=int(max(self.created_at, self.assigned_at, self.ended_at) * 1e9),
            participant_identity=self.participant_identity,
            worker_id=self.worker_id,
            agent_id=self.agent_id,
        )


@dataclass(eq=False)
class Dispatch:
    id: str
    agent_name: str
    room: str
    metadata: str = ""
    attributes: dict[str, str] = field(default_factory=dict)
    deployment: str = ""
    restart_policy: int = agent_dispatch.JobRestartPolicy.JRP_ON_FAILURE
    created_at: float = field(default_factory=time.time)
    deleted_at: float = 0.0
    job_ids: list[str] = field(default_factory=list)


JobListener = Callable[[Job, JobState | None], None]
DispatchListener = Callable[[Dispatch], None]


class IllegalTransition(Exception):
    pass


class PendingCounts:
    """Jobs waiting for a worker (state pending): in all, by room and by agent name.

    Kept up to date as jobs enter and leave PENDING (a JobBook job listener), so that checking a
    new job against the queue's quotas costs O(1) however many jobs wait. Each job is counted
    once, by id: a job restored after a restart, which never passed through `add_job`, is
    counted when it is queued again, and one never counted is never subtracted.
    """

    def __init__(self) -> None:
        self.total = 0
        self._by_room: dict[str, int] = {}
        self._by_agent: dict[str, int] = {}
        self._counted: set[str] = set()

    def in_room(self, room: str) -> int:
        return self._by_room.get(room, 0)

    def for_agent(self, agent_name: str) -> int:
        return self._by_agent.get(agent_name, 0)

    def job_changed(self, job: Job, previous: JobState | None = None) -> None:
        pending = job.state == JobState.PENDING
        if pending == (job.id in self._counted):
            return
        if pending:
            self._counted.add(job.id)
            self.total += 1
            _step(self._by_room, job.room, 1)
            _step(self._by_agent, job.agent_name, 1)
        else:
            self._counted.discard(job.id)
            self.total -= 1
            _step(self._by_room, job.room, -1)
            _step(self._by_agent, job.agent_name, -1)


def _step(counts: dict[str, int], key: str, by: int) -> None:
    n = counts.get(key, 0) + by
    if n:
        counts[key] = n
    else:
        del counts[key]  # rooms come and go: keep only those with jobs waiting


class JobBook:
    """Live jobs and dispatches; ended jobs stay a while (ListDispatch), then only in the store."""

    def __init__(self, finished_in_memory: int = 10_000) -> None:
        self.jobs: dict[str, Job] = {}
        self.dispatches: dict[str, Dispatch] = {}
        self._by_room: dict[str, dict[str, Dispatch]] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._finished_cap = finished_in_memory
        self.job_listeners: list[JobListener] = []
        self.dispatch_listeners: list[DispatchListener] = []

    def add_dispatch(self, dispatch: Dispatch, record: bool = True) -> None:
        self.dispatches[dispatch.id] = dispatch
        self._by_room.setdefault(dispatch.room, {})[dispatch.id] = dispatch
        if record:
            self._dispatch_changed(dispatch)

    def _forget_dispatch(self, dispatch: Dispatch) -> None:
        self.dispatches.pop(dispatch.id, None)
        room = self._by_room.get(dispatch.room)
        if room is not None:
            room.pop(dispatch.id, None)
            if not room:
                del self._by_room[dispatch.room]

    def delete_dispatch(self, dispatch: Dispatch) -> None:
        dispatch.deleted_at = time.time()
        self._dispatch_changed(dispatch)
        self._forget_dispatch(dispatch)

    def add_job(self, job: Job) -> None:
        self.jobs[job.id] = job
        dispatch = self.dispatches.get(job.dispatch_id)
        if dispatch is not None:
            dispatch.job_ids.append(job.id)
        for listener in self.job_listeners:
            listener(job, None)

    def transition(self, job: Job, state: JobState, error: str = "") -> bool:
        """Move `job` to `state`; False (and no change) if the job already ended."""
        if job.ended:
            return False
        if state not in _NEXT[job.state] and state != job.state:
            raise IllegalTransition(f"job {job.id}: {job.state} -> {state}")
        previous = job.state
        job.state = state
        now = time.time()
        if state == JobState.PENDING:
            job.queued_at = now
        elif state == JobState.ASSIGNED:
            job.assigned_at = now
        elif state == JobState.RUNNING and not job.started_at:
            job.started_at = now
        if state in ENDED:
            job.ended_at = now
            job.error = error
            self._retire(job)
        for listener in self.job_listeners:
            listener(job, previous)
        return True

    def touch(self, job: Job) -> None:
        """`job` changed but not its state (its worker, when one claims it back): listeners get
        it with `previous` equal to its state, so that those that count states count nothing."""
        for listener in self.job_listeners:
            listener(job, job.state)

    def _retire(self, job: Job) -> None:
        self._finished[job.id] = None
        while len(self._finished) > self._finished_cap:
            old_id, _ = self._finished.popitem(last=False)
            old = self.jobs.pop(old_id, None)
            if old is not None:
                dispatch = self.dispatches.get(old.dispatch_id)
                if dispatch is not None and all(self.jobs.get(j) is None for j in dispatch.job_ids):
                    self._forget_dispatch(dispatch)

    def _dispatch_changed(self, dispatch: Dispatch) -> None:
        for listener in self.dispatch_listeners:
            listener(dispatch)

    def in_room(self, room: str) -> list[Dispatch]:
        return list(self._by_room.get(room, {}).values())

    def dispatch_proto(self, dispatch: Dispatch) -> agent_dispatch.AgentDispatch:
        jobs = [self.jobs[j].to_proto() for j in dispatch.job_ids if j in self.jobs]
        state = agent_dispatch.AgentDispatchState(
            jobs=jobs,
            created_at=int(dispatch.created_at * 1e9),
            deleted_at=int(dispatch.deleted_at * 1e9),
        )
        out = agent_dispatch.AgentDispatch(
            id=dispatch.id,
            agent_name=dispatch.agent_name,
            room=dispatch.room,
            metadata=dispatch.metadata,
            state=state,
            deployment=dispatch.deployment,
            restart_policy=dispatch.restart_policy,  # type: ignore[arg-type]
        )
        out.attributes.update(dispatch.attributes)
        return out

    def counts(self) -> dict[JobState, int]:
        counts = dict.fromkeys(JobState, 0)
        for job in self.jobs.values():
            counts[job.state] += 1
        return counts
