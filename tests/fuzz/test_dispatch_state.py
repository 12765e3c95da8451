"""The dispatcher's scheduler and job book, driven by a state machine of workers and callers.

Workers register, report load and status, drain, die (and come back to claim their jobs, or
their process exits), answer offers (in time, late, or not at all); callers create and delete
dispatches; jobs start, end, fail. Time is the event loop's own clock, moved by the machine, so
every timer (availability, start, re-dispatch grace, retry) fires in-process without sleeping.
After every step the invariants below must hold: no job on two workers, none lost or stuck,
the queue in order, and the workers' counts matching the book's.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from livekit.protocol import agent, agent_dispatch

from voicefleet.config import DispatchSettings, Project
from voicefleet.dispatch.endpoint import _handle
from voicefleet.dispatch.jobs import Dispatch, JobState, new_id
from voicefleet.dispatch.registry import PoolKey, Worker
from voicefleet.dispatch.scheduler import job_key
from voicefleet.dispatch.service import DispatchService
from voicefleet.errors import NoCapacity, NotFound
from voicefleet.metrics import Metrics
from voicefleet.protocol.tokens import WorkerIdentity

AGENTS = ("alice", "bob")
INSTANCES = ("i1", "i2", "i3")
# Small against the steps the machine takes: offers time out, jobs are taken back, workers'
# jobs wait out their grace, all within a run.
SETTINGS = DispatchSettings(
    availability_timeout=0.5,
    start_timeout=2.0,
    queue_timeout=3600.0,
    retry_interval=0.25,
    queue_limit=12,
    queue_limit_per_room=6,
    queue_limit_per_agent=8,
    redispatch_grace=1.0,
)
STEP = 0.05  # the clock moves by at most this much between two turns of the loop


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock moves only when the test moves it."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def time(self) -> float:
        return self.now


@dataclass(eq=False)
class SimWorker:
    """What one worker process knows: the offers it got, the jobs it was given."""

    worker: Worker
    instance: str
    reports_jobs: bool
    alive: bool = True
    claimed: bool = False  # dead, and its process already came back or exited
    offers: list[str] = field(default_factory=list)
    jobs: set[str] = field(default_factory=set)  # assigned to it, not ended or terminated


class DispatchMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = VirtualClockLoop()
        asyncio.set_event_loop(self.loop)
        project = Project(name="fuzz", api_key="devkey", api_secret="secret" * 6)
        self.service = DispatchService(project, SETTINGS, Metrics())
        self.workers: list[SimWorker] = []
        self.dispatches: list[Dispatch] = []
        self.rooms = 0

    def teardown(self) -> None:
        self.loop.run_until_complete(self.service.close())
        self.loop.close()
        asyncio.set_event_loop(None)

    # -- the loop and the clock ---------------------------------------------------------------

    def settle(self) -> None:
        """Run every callback and task that is ready now, then read what workers were sent."""
        for _ in range(30):
            self.loop.run_until_complete(asyncio.sleep(0))
        for sim in self.workers:
            self.read_outbox(sim)

    def read_outbox(self, sim: SimWorker) -> None:
        while not sim.worker.outbox.empty():
            msg = agent.ServerMessage()
            msg.ParseFromString(sim.worker.outbox.get_nowait())
            which = msg.WhichOneof("message")
            if which == "availability":
                sim.offers.append(msg.availability.job.id)
            elif which == "assignment":
                sim.jobs.add(msg.assignment.job.id)
            elif which == "termination":
                sim.jobs.discard(msg.termination.job_id)

    def run_in_loop(self, fn: object) -> None:
        async def call() -> None:
            fn()  # type: ignore[operator]

        self.loop.run_until_complete(call())
        self.settle()

    def live(self) -> list[SimWorker]:
        return [s for s in self.workers if s.alive]

    def dead(self) -> list[SimWorker]:
        return [s for s in self.workers if not s.alive and not s.claimed]

    def send(self, sim: SimWorker, msg: agent.WorkerMessage) -> None:
        self.run_in_loop(lambda: _handle(self.service, sim.worker, msg))

    # -- workers ------------------------------------------------------------------------------

    @initialize()
    def first_workers(self) -> None:
        for agent_name, instance in zip(AGENTS, INSTANCES, strict=False):
            self.workers.append(self._register(agent_name, instance, reports_jobs=True))
        self.settle()

    @rule(
        agent_name=st.sampled_from(AGENTS),
        instance=st.sampled_from(INSTANCES),
        reports_jobs=st.booleans(),
    )
    def register(self, agent_name: str, instance: str, reports_jobs: bool) -> None:
        self.workers.append(self._register(agent_name, instance, reports_jobs))
        self.settle()

    def _register(self, agent_name: str, instance: str, reports_jobs: bool) -> SimWorker:
        request = agent.RegisterWorkerRequest(agent_name=agent_name, type=agent.JobType.JT_ROOM)
        identity = WorkerIdentity(agent=agent_name, version="v1", instance=instance)
        holder: list[Worker] = []

        def add() -> None:
            holder.append(
                self.service.registry.add(
                    new_id("AW_"), request, api_key="devkey", identity=identity
                )
            )

        self.loop.run_until_complete(_call(add))
        return SimWorker(holder[0], instance, reports_jobs)

    @precondition(lambda self: self.live())
    @rule(
        data=st.data(),
        full=st.booleans(),
        load=st.sampled_from([0.0, 0.5, 1.0]),
        draining=st.booleans(),
    )
    def status(self, data: st.DataObject, full: bool, load: float, draining: bool) -> None:
        sim = data.draw(st.sampled_from(self.live()))
        status = agent.WorkerStatus.WS_FULL if full else agent.WorkerStatus.WS_AVAILABLE
        update = agent.UpdateWorkerStatus(
            status=status, load=load, job_count=len(sim.jobs), draining=draining
        )
        self.send(sim, agent.WorkerMessage(update_worker=update))

    @precondition(lambda self: self.live())
    @rule(data=st.data())
    def drain(self, data: st.DataObject) -> None:
        sim = data.draw(st.sampled_from(self.live()))
        self.run_in_loop(lambda: self.service.drain_instance(sim.instance))

    @precondition(lambda self: self.live())
    @rule(data=st.data())
    def die(self, data: st.DataObject) -> None:
        """The connection drops (the process may live on and reconnect)."""
        sim = data.draw(st.sampled_from(self.live()))
        sim.alive = False
        self.run_in_loop(lambda: self.service.scheduler.worker_gone(sim.worker, "disconnected"))

    @precondition(lambda self: self.dead())
    @rule(data=st.data())
    def reconnect(self, data: st.DataObject) -> None:
        """The process of a worker whose connection dropped connects again and says which jobs
        it still runs (livekit-agents' migrate_job)."""
        old = data.draw(st.sampled_from(self.dead()))
        old.claimed = True
        new = self._register(old.worker.key.agent_name, old.instance, old.reports_jobs)
        new.jobs = set(old.jobs)
        self.workers.append(new)
        self.settle()
        migrate = agent.MigrateJobRequest(job_ids=sorted(new.jobs))
        self.send(new, agent.WorkerMessage(migrate_job=migrate))

    @precondition(lambda self: self.dead())
    @rule(data=st.data(), redispatch=st.booleans())
    def process_exits(self, data: st.DataObject, redispatch: bool) -> None:
        """The process of a dead worker ends (crashed: redispatch; stopped: not)."""
        old = data.draw(st.sampled_from(self.dead()))
        for sim in self.workers:
            if sim.instance == old.instance and sim.alive:
                sim.alive = False
                self.run_in_loop(
                    lambda s=sim: self.service.scheduler.worker_gone(s.worker, "exited")
                )
        for sim in self.workers:
            if sim.instance == old.instance:
                sim.claimed = True
        self.run_in_loop(lambda: self.service.instance_exited(old.instance, redispatch=redispatch))

    @precondition(lambda self: any(s.offers for s in self.live()))
    @rule(data=st.data(), available=st.booleans(), terminate=st.booleans())
    def answer(self, data: st.DataObject, available: bool, terminate: bool) -> None:
        """A worker answers an offer: in time or late, yes or no (or ends the job)."""
        sim = data.draw(st.sampled_from([s for s in self.live() if s.offers]))
        job_id = data.draw(st.sampled_from(sim.offers))
        sim.offers.remove(job_id)
        response = agent.AvailabilityResponse(
            job_id=job_id,
            available=available,
            terminate=terminate and not available,
            participant_identity=f"agent-{sim.worker.id}",
        )
        self.send(sim, agent.WorkerMessage(availability=response))

    @precondition(lambda self: any(s.offers for s in self.live()))
    @rule(data=st.data())
    def accept_all(self, data: st.DataObject) -> None:
        """A worker says yes to every offer it has (the common case, made common here)."""
        sim = data.draw(st.sampled_from([s for s in self.live() if s.offers]))
        offers, sim.offers = sim.offers, []
        for job_id in offers:
            response = agent.AvailabilityResponse(
                job_id=job_id, available=True, participant_identity=f"agent-{sim.worker.id}"
            )
            self.send(sim, agent.WorkerMessage(availability=response))

    @precondition(lambda self: any(s.jobs and s.reports_jobs for s in self.live()))
    @rule(
        data=st.data(),
        status=st.sampled_from(
            [
                agent.JobStatus.JS_RUNNING,
                agent.JobStatus.JS_RUNNING,
                agent.JobStatus.JS_SUCCESS,
                agent.JobStatus.JS_FAILED,
                agent.JobStatus.JS_CANCELLED,
            ]
        ),
    )
    def job_status(self, data: st.DataObject, status: int) -> None:
        """A worker reports a job's status (late, or for a job taken back from it, included)."""
        sim = data.draw(st.sampled_from([s for s in self.live() if s.jobs and s.reports_jobs]))
        job_id = data.draw(st.sampled_from(sorted(sim.jobs)))
        if status != agent.JobStatus.JS_RUNNING:
            sim.jobs.discard(job_id)
        update = agent.UpdateJobStatus(job_id=job_id, status=status)  # type: ignore[arg-type]
        self.send(sim, agent.WorkerMessage(update_job=update))

    # -- callers ------------------------------------------------------------------------------

    @rule(
        agent_name=st.sampled_from(AGENTS),
        room=st.integers(0, 2),
        never=st.booleans(),
    )
    def create_dispatch(self, agent_name: str, room: int, never: bool) -> None:
        policy = (
            agent_dispatch.JobRestartPolicy.JRP_NEVER
            if never
            else agent_dispatch.JobRestartPolicy.JRP_ON_FAILURE
        )
        created: list[Dispatch] = []

        def create() -> None:
            try:
                created.append(
                    self.service.create_dispatch(
                        agent_name=agent_name, room=f"room{room}", restart_policy=policy
                    )
                )
            except NoCapacity:
                pass

        self.run_in_loop(create)
        self.dispatches.extend(created)

    @precondition(lambda self: self.dispatches)
    @rule(data=st.data())
    def delete_dispatch(self, data: st.DataObject) -> None:
        dispatch = data.draw(st.sampled_from(self.dispatches))

        def delete() -> None:
            try:
                self.service.delete_dispatch(dispatch.id, dispatch.room)
            except NotFound:
                assert dispatch.deleted_at, "a dispatch not deleted was not found"

        self.run_in_loop(delete)

    # -- time ---------------------------------------------------------------------------------

    @rule(seconds=st.sampled_from([0.05, 0.3, 0.6, 1.2, 2.5]))
    def wait(self, seconds: float) -> None:
        end = self.loop.now + seconds
        while self.loop.now < end:
            self.loop.now = min(end, self.loop.now + STEP)
            for _ in range(4):
                self.loop.run_until_complete(asyncio.sleep(0))
        self.settle()

    @rule()
    def queue_timeout_passes(self) -> None:
        self.run_in_loop(lambda: self.service.scheduler.expire_queued(time.time() + 10_000))

    # -- invariants ---------------------------------------------------------------------------

    @invariant()
    def every_job_is_somewhere_and_on_one_worker_at_most(self) -> None:
        scheduler = self.service.scheduler
        live = self.service.registry.workers
        holders: dict[str, list[str]] = {}
        for w in live.values():
            assert w.connected
            for job_id in w.jobs:
                holders.setdefault(job_id, []).append(w.id)
        queued: dict[str, list[PoolKey]] = {}
        for key, waiting in scheduler._waiting.items():
            for job in waiting:
                if job.state == JobState.PENDING:
                    queued.setdefault(job.id, []).append(key)
        offered: dict[str, list[str]] = {}
        for w in live.values():
            for job_id, fut in w.offers.items():
                if not fut.done():
                    offered.setdefault(job_id, []).append(w.id)
        for job_id, workers in holders.items():
            assert len(workers) == 1, f"job {job_id} is on workers {workers}"
        for job in self.service.book.jobs.values():
            where = (
                f"job {job.id} {job.state} (worker {job.worker_id!r}, queued in "
                f"{queued.get(job.id)}, offered to {offered.get(job.id)}, held by "
                f"{holders.get(job.id)})"
            )
            if job.ended:
                assert job.id not in holders, where
                assert job.id not in queued, where
                if job.state != JobState.SUCCEEDED:
                    assert job.error, f"{where} ended with no reason"
            elif job.state == JobState.PENDING:
                assert not job.worker_id, where
                assert job.id not in holders, where
                places = len(queued.get(job.id, [])) + len(offered.get(job.id, []))
                assert places == 1, f"{where}: waits in {places} places, not one"
                if job.id in queued:
                    assert queued[job.id] == [job_key(job)], where
            else:  # assigned or running
                if job.worker_id:
                    assert holders.get(job.id) == [job.worker_id], where
                else:
                    assert job.id not in holders, where
                    assert job.id in scheduler._orphans, f"{where}: no worker, no grace"
                assert job.id not in queued, where

    @invariant()
    def workers_hold_only_their_open_jobs(self) -> None:
        book = self.service.book
        for w in self.service.registry.workers.values():
            for job_id in w.jobs:
                job = book.jobs.get(job_id)
                assert job is not None, f"worker {w.id} holds unknown job {job_id}"
                assert not job.ended and job.worker_id == w.id, f"{w.id} holds {job}"

    @invariant()
    def queue_is_fifo_and_counted(self) -> None:
        scheduler = self.service.scheduler
        for key, waiting in scheduler._waiting.items():
            pending = [j for j in waiting if j.state == JobState.PENDING]
            fresh = [j.created_at for j in pending if not j.redispatches]
            assert fresh == sorted(fresh), f"queue of {key} is out of order"
            if pending:
                assert key in scheduler._pumps, f"jobs wait for {key} with no pump"
        in_book = sum(1 for j in self.service.book.jobs.values() if j.state == JobState.PENDING)
        assert scheduler.pending.total == in_book

    @invariant()
    def no_job_waits_while_a_worker_is_free(self) -> None:
        scheduler = self.service.scheduler
        for key, waiting in scheduler._waiting.items():
            free = [w for w in self.service.registry.pools.get(key, []) if w.available]
            for job in waiting:
                if job.state != JobState.PENDING or job.tried or job.not_started_by:
                    continue
                assert not free, f"{job.id} waits while {[w.id for w in free]} are free"

    @invariant()
    def coverage(self) -> None:
        """What the run reached (pytest --hypothesis-show-statistics lists it)."""
        jobs = self.service.book.jobs.values()
        for state in {j.state for j in jobs}:
            event(f"a job {state}")
        if any(j.redispatches for j in jobs):
            event("a job dispatched again after its worker died")
        if any(j.not_started_by for j in jobs):
            event("a job taken back: not started in time")
        if self.service.scheduler._orphans:
            event("a job within its re-dispatch grace")
        if any(j.tried for j in jobs if j.state == JobState.PENDING):
            event("a job refused or not answered")

    @invariant()
    def every_dispatch_has_its_job(self) -> None:
        for dispatch in self.dispatches:
            assert dispatch.job_ids
            for job_id in dispatch.job_ids:
                job = self.service.book.jobs.get(job_id)
                assert job is not None, f"job {job_id} of {dispatch.id} was lost"
                if dispatch.deleted_at:
                    assert job.ended, f"{job_id} of deleted {dispatch.id} is {job.state}"


async def _call(fn: object) -> None:
    fn()  # type: ignore[operator]


TestDispatch = DispatchMachine.TestCase
# The loaded profile's (tests/conftest.py), with runs long enough to reach the grace and retries.
TestDispatch.settings = settings(settings.default, stateful_step_count=50)
