"""Connected workers and their status: the one place a worker's state lives."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from livekit.protocol import agent, models

from voicefleet.protocol.tokens import UNMANAGED, WorkerIdentity

UNMANAGED_POOL = "unmanaged"


class WorkerStatus(StrEnum):
    AVAILABLE = "available"
    FULL = "full"
    DRAINING = "draining"
    DISCONNECTED = "disconnected"


@dataclass(frozen=True)
class PoolKey:
    """Workers that can take the same jobs: LiveKit matches on agent name, namespace, job type."""

    agent_name: str
    namespace: str
    job_type: int


@dataclass(eq=False)
class Worker:
    id: str
    key: PoolKey
    sdk_version: str
    deployment: str
    api_key: str
    identity: WorkerIdentity
    permissions: models.ParticipantPermission
    outbox: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue, repr=False)
    reported_full: bool = False
    load: float = 0.0
    job_count: int = 0
    draining: bool = False
    connected: bool = True
    # Whether it ever sent a job's status. livekit-agents for Python does from its first job on;
    # @livekit/agents for Node (1.9) never does by itself (voicefleet's instances do, through
    # runtime/node_jobs.mjs): a hand-started Node worker's jobs are never seen to start or end.
    reports_jobs: bool = False
    # Job ids assigned to this worker and not ended.
    jobs: set[str] = field(default_factory=set)
    # Availability requests awaiting this worker's answer, by job id.
    offers: dict[str, asyncio.Future[agent.AvailabilityResponse]] = field(default_factory=dict)
    registered_at: float = field(default_factory=time.time)

    @property
    def pool(self) -> str:
        return self.identity.version or UNMANAGED_POOL

    @property
    def status(self) -> WorkerStatus:
        if not self.connected:
            return WorkerStatus.DISCONNECTED
        if self.draining:
            return WorkerStatus.DRAINING
        if self.reported_full:
            return WorkerStatus.FULL
        return WorkerStatus.AVAILABLE

    @property
    def available(self) -> bool:
        return self.connected and not self.draining and not self.reported_full

    def send(self, msg: agent.ServerMessage) -> None:
        """Queue a frame; the connection's writer sends it, so the caller never waits on I/O."""
        if self.connected:
            self.outbox.put_nowait(msg.SerializeToString())


CapacityListener = Callable[[PoolKey], None]
WorkerListener = Callable[[Worker], None]


@dataclass(frozen=True)
class PoolLoad:
    """What a pool of workers can take, as one worker would report it (gateway mode)."""

    load: float  # share of the pool's capacity in use, 0..1 (1 when it has no worker)
    available: bool  # some worker can take a job now
    jobs: int  # jobs its workers hold


def pool_load(workers: Sequence[Worker]) -> PoolLoad:
    """Each connected worker is an equal share of capacity: a worker that takes no job (full,
    draining) is a share in use, one that does counts with the load it reported."""
    connected = [w for w in workers if w.connected]
    if not connected:
        return PoolLoad(load=1.0, available=False, jobs=0)
    used = sum(min(max(w.load, 0.0), 1.0) if w.available else 1.0 for w in connected)
    return PoolLoad(
        load=used / len(connected),
        available=any(w.available for w in connected),
        jobs=sum(len(w.jobs) for w in connected),
    )


class Registry:
    """Workers by id and by pool, in registration order (the round robin's order)."""

    def __init__(self) -> None:
        self.workers: dict[str, Worker] = {}
        self.pools: dict[PoolKey, list[Worker]] = {}
        # Agent names workers registered with since this server started (see `knows`).
        self._names: set[str] = set()
        self._listeners: list[CapacityListener] = []
        self._changed: list[CapacityListener] = []
        self._registered: list[WorkerListener] = []

    def on_register(self, listener: WorkerListener) -> None:
        """Call `listener(worker)` when a worker registers."""
        self._registered.append(listener)

    def on_change(self, listener: CapacityListener) -> None:
        """Call `listener(key)` when a worker of pool `key` comes, goes or reports its status."""
        self._changed.append(listener)

    def _change(self, key: PoolKey) -> None:
        for listener in self._changed:
            listener(key)

    def pool_load(self, key: PoolKey) -> PoolLoad:
        return pool_load(self.pools.get(key, ()))

    def on_capacity(self, listener: CapacityListener) -> None:
        """Call `listener(key)` whenever a worker of pool `key` may take a job it could not."""
        self._listeners.append(listener)

    def knows(self, agent_name: str) -> bool:
        """Whether a worker registered with `agent_name` since this server started.

        Workers authenticate, so their names are the operator's, unlike the names callers
        dispatch to; and an agent whose workers are all gone stays known while its jobs wait."""
        return agent_name in self._names

    def _capacity(self, key: PoolKey) -> None:
        for listener in self._listeners:
            listener(key)

    def add(
        self,
        worker_id: str,
        register: agent.RegisterWorkerRequest,
        *,
        api_key: str,
        identity: WorkerIdentity = UNMANAGED,
    ) -> Worker:
        permissions = models.ParticipantPermission()
        if register.HasField("allowed_permissions"):
            permissions.CopyFrom(register.allowed_permissions)
        else:
            permissions = models.ParticipantPermission(
                can_subscribe=True, can_publish=True, can_publish_data=True
            )
        key = PoolKey(register.agent_name, register.namespace, register.type)
        worker = Worker(
            id=worker_id,
            key=key,
            sdk_version=register.version,
            deployment=register.deployment,
            api_key=api_key,
            identity=identity,
            permissions=permissions,
        )
        self.workers[worker_id] = worker
        self.pools.setdefault(key, []).append(worker)
        self._names.add(key.agent_name)
        for listener in self._registered:
            listener(worker)
        self._capacity(key)
        self._change(key)
        return worker

    def remove(self, worker: Worker) -> None:
        worker.connected = False
        self.workers.pop(worker.id, None)
        pool = self.pools.get(worker.key)
        if pool is not None and worker in pool:
            pool.remove(worker)
            if not pool:
                del self.pools[worker.key]
        self._change(worker.key)

    def update(self, worker: Worker, update: agent.UpdateWorkerStatus) -> None:
        was_available = worker.available
        if update.HasField("status"):
            worker.reported_full = update.status == agent.WorkerStatus.WS_FULL
        worker.load = update.load
        previous_jobs, worker.job_count = worker.job_count, update.job_count
        if update.draining:
            worker.draining = True
        if worker.available and (not was_available or worker.job_count < previous_jobs):
            self._capacity(worker.key)
        self._change(worker.key)

    def drain(self, worker: Worker) -> None:
        """Stop offering jobs to `worker`; the jobs it has run to their end."""
        worker.draining = True
        self._change(worker.key)

    def job_ended(self, worker: Worker) -> None:
        if worker.available:
            self._capacity(worker.key)
        self._change(worker.key)

    def counts(self) -> dict[WorkerStatus, int]:
        counts = dict.fromkeys(WorkerStatus, 0)
        for worker in self.workers.values():
            counts[worker.status] += 1
        return counts
