"""The rollout runner, driven by a state machine of deploys, operators, callers and crashes.

One agent, one deployment. The operator deploys new versions (rolling, blue-green whose smoke
test passes, fails or hangs, canary with random steps), some of which never come up; rolls back
to a kept version, rolls a kept version out again with a strategy, restarts, scales, tells a
canary to pause, resume, promote or abort. Retired instances are kept warm, or drained by the
reaper as soon as they are idle (`keep_warm` 0), per run. Callers start sessions, dispatched by
the real `DispatchService` (so routing by version weight is the real one), and end them;
instances crash and come back; time passes.

Everything above the processes is real: the control plane (`ControlPlane`: roll_to, rollback,
restart, scale), the runner and its strategies, `Instances` (ensure, retire, give up, drain, the
reaper), the store (SQLite) and the dispatcher. Only the processes are fake (`FakeRuntime`): a
process "comes up" by registering a worker with the dispatcher, takes the jobs it is offered,
and, drained, exits once its sessions are over, as livekit-agents does on SIGTERM. Time is the
event loop's clock, moved by the machine; every wait of a rollout counts on it.

After every step: the deployment has a serving instance (ready and routable; or, a moment after
the machine crashed one, another coming up); no session was cut (no instance stopped while it
had one, no caller's job ended but by the caller, its worker, or a crash); the routing weights
sum to 100 and name only versions with serving instances, and, with no rollout running, name the
version the store says is serving, as the last rollout left it. A rollback to any kept version
is accepted whenever no rollout is running, and every rollout ends once time passes, but a
canary waiting for its operator (paused, holding its last step, or short of sessions to judge),
which ends when told. A grace period ending in a kill is not played: the agent's is longer than
a run.

`HYPOTHESIS_PROFILE=deep` (tests/conftest.py) explores further; CI runs the bounded profile.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import shutil
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cryptography.fernet import Fernet
from hypothesis import currently_in_test_context, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from livekit.protocol import agent

from tests.fuzz.test_dispatch_state import VirtualClockLoop
from voicefleet.config import DispatchSettings, Project
from voicefleet.control import service as control_module
from voicefleet.control.service import ControlPlane
from voicefleet.control.sizing import Sizing
from voicefleet.dispatch import service as service_module
from voicefleet.dispatch.endpoint import _handle
from voicefleet.dispatch.jobs import ENDED, Job, JobState
from voicefleet.dispatch.registry import Worker
from voicefleet.dispatch.service import DispatchService
from voicefleet.errors import InvalidRequest
from voicefleet.fleet import LIVE, Instances, Lifecycle, Paths
from voicefleet.fleet import instances as instances_module
from voicefleet.metrics import Metrics
from voicefleet.protocol.tokens import WorkerIdentity
from voicefleet.rollout.bluegreen import BlueGreen
from voicefleet.rollout.canary import CanaryPlan, Thresholds
from voicefleet.rollout.model import RUNNING, SERVED, RolloutState
from voicefleet.rollout.plans import Plan, parse_plan
from voicefleet.rollout.rolling import Rolling
from voicefleet.rollout.runner import Rollouts
from voicefleet.rollout.smoke import SmokeTest
from voicefleet.runtime import InstanceSpec, InstanceState, InstanceStatus
from voicefleet.runtime.base import RuntimeBase
from voicefleet.store.db import open_engine
from voicefleet.store.models import AgentRow, DeploymentRow, RolloutRow, VersionRow
from voicefleet.store.repo import Repo
from voicefleet.store.secrets import SecretBox

T = TypeVar("T")

DEP = "production"
GRACE = 3600.0  # the agent's grace period: longer than any run, so no drain ends in a kill
STARTUP = 0.5  # a fake process registers its worker this long after it starts
BACKOFF = 1.0  # a crashed process starts again after this long (as the local runtime's first)
SERVING_TIMEOUT = 10.0
REAP_INTERVAL = 30.0
SMOKE = SmokeTest(sessions=2, timeout=5.0)
# Long enough for the slowest rollout the rules make to end: a version that never registers
# (serving timeout), a hung smoke test, four canary steps of the longest interval.
QUIESCE = 4 * 30.0 + SERVING_TIMEOUT + SMOKE.timeout + 10.0


def note(what: str) -> None:
    """What a run reached (pytest --hypothesis-show-statistics lists it); the seeds, run as
    plain tests, reach it too."""
    if currently_in_test_context():
        event(what)


class FakeProcess:
    """One instance's process, as far as the dispatcher and the runtime's listeners see it."""

    def __init__(self, state: InstanceState) -> None:
        self.state = state
        self.worker: Worker | None = None
        self.draining = False  # SIGTERM'd: it exits once its sessions are over
        self.stopping = False
        self.down = False  # crashed, waiting out its restart backoff
        self.gone = False  # exited for good


class FakeRuntime(RuntimeBase[FakeProcess]):
    """Processes as records. A version named in `broken` never serves: "crash" dies as it
    starts (and again after each backoff), "hang" never registers its worker."""

    def __init__(self, dispatch: DispatchService) -> None:
        super().__init__()
        self.dispatch = dispatch
        self.broken: dict[str, str] = {}
        self.cuts: list[str] = []  # instances stopped while they had sessions
        self._pids = itertools.count(100)
        self._workers = itertools.count(1)

    def process(self, instance_id: str) -> FakeProcess:
        return self._instances[instance_id]

    def processes(self) -> list[FakeProcess]:
        return list(self._instances.values())

    # -- the Runtime port ---------------------------------------------------------------------

    async def start(self, spec: InstanceSpec) -> InstanceState:
        p = FakeProcess(InstanceState(spec=spec, pid=next(self._pids), started_at=time.time()))
        self._instances[spec.instance_id] = p
        asyncio.get_running_loop().call_later(STARTUP, self._up, p)
        return p.state

    async def adopt(self, spec: InstanceSpec, pid: int, started_at: float) -> InstanceState | None:
        return None

    async def drain(
        self, instance_id: str, grace: float | None = None, signalled: bool = False
    ) -> None:
        p = self._instances.get(instance_id)
        if p is None or p.draining:
            return
        p.draining = True
        if p.down or p.gone:  # crashed, in its backoff: it stays down
            return
        self._set(p, InstanceStatus.DRAINING)
        if p.worker is not None:  # livekit-agents says so on SIGTERM
            self.dispatch.registry.drain(p.worker)

    async def stop(self, instance_id: str) -> None:
        p = self._instances.get(instance_id)
        if p is None or p.gone:
            return
        p.stopping = True
        if p.worker is not None and p.worker.jobs:
            self.cuts.append(f"{instance_id} stopped with sessions {sorted(p.worker.jobs)}")
        self._exit(p)

    async def close(self, leave_running: bool) -> None:
        pass

    # -- the processes' own lives -------------------------------------------------------------

    def _up(self, p: FakeProcess) -> None:
        if p.gone or p.down:
            return
        spec = p.state.spec
        mode = self.broken.get(spec.version)
        if mode == "hang":
            return
        if mode == "crash":
            self._crash(p)
            return
        request = agent.RegisterWorkerRequest(
            agent_name=spec.env["LIVEKIT_AGENT_NAME_OVERRIDE"],
            type=agent.JobType.JT_ROOM,
            deployment=spec.deployment,
        )
        identity = WorkerIdentity(spec.agent_id, spec.version, spec.instance_id)
        p.worker = self.dispatch.registry.add(
            f"AW_{next(self._workers):04d}", request, api_key="key", identity=identity
        )
        if p.draining:
            self.dispatch.registry.drain(p.worker)
            self._set(p, InstanceStatus.DRAINING)
        else:
            self._set(p, InstanceStatus.READY)

    def crash(self, p: FakeProcess) -> list[str]:
        """The process dies (the machine's doing); returns the jobs it had."""
        jobs = sorted(p.worker.jobs) if p.worker else []
        self._crash(p)
        return jobs

    def _crash(self, p: FakeProcess) -> None:
        if p.worker is not None:
            self.dispatch.scheduler.worker_gone(p.worker, "exited")
            p.worker = None
        p.state.restarts += 1
        self._set(p, InstanceStatus.FAILED)
        if p.draining or p.stopping:  # died on its way out: not started again
            p.gone = True
            self._set(p, InstanceStatus.STOPPED)
            return
        p.down = True
        asyncio.get_running_loop().call_later(BACKOFF, self._respawn, p)

    def _respawn(self, p: FakeProcess) -> None:
        p.down = False
        if p.draining or p.stopping or p.gone:
            p.gone = True
            self._set(p, InstanceStatus.STOPPED)
            return
        self._set(p, InstanceStatus.STARTING)
        asyncio.get_running_loop().call_later(STARTUP, self._up, p)

    def exit_drained(self) -> bool:
        """Drained processes whose sessions are over exit (livekit-agents after SIGTERM)."""
        exited = False
        for p in self._instances.values():
            if p.draining and not p.gone and not p.down and not (p.worker and p.worker.jobs):
                self._exit(p)
                exited = True
        return exited

    def _exit(self, p: FakeProcess) -> None:
        if p.worker is not None:
            self.dispatch.scheduler.worker_gone(p.worker, "exited")
            p.worker = None
        p.gone = True
        self._set(p, InstanceStatus.STOPPED)


@dataclass
class Template:
    """A migrated store, copied for each run (migrating takes longer than a run's steps)."""

    path: Path


_template: Template | None = None


def store_template() -> Path:
    global _template
    if _template is None:
        folder = Path(tempfile.mkdtemp(prefix="vf-rollout-fuzz-"))
        path = folder / "store.db"

        async def make() -> None:
            engine = await open_engine(f"sqlite+aiosqlite:///{path}")
            await engine.dispose()

        asyncio.run(make())
        _template = Template(path)
    return _template.path


# Where ids are made at random: dispatches' and jobs' ids, rollouts', instances' suffixes.
PATCHED = ((service_module, "new_id"), (control_module, "new_id"), (instances_module, "secrets"))


class CountedTokens:
    """`secrets.token_hex` counted: instance ids in order, not random."""

    def __init__(self) -> None:
        self.count = itertools.count(1)

    def token_hex(self, nbytes: int) -> str:
        return f"{next(self.count):0{2 * nbytes}x}"


class RolloutMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        # Ids in order, not random: which version a call is routed to is a hash of its
        # dispatch's id, and the rules pick calls and instances by id; a run must do the same
        # when it is replayed (or shrunk).
        self.ids = itertools.count(1)
        self._patched = [(m, name, getattr(m, name)) for m, name in PATCHED]
        for m, name, _ in self._patched:
            setattr(m, name, CountedTokens() if name == "secrets" else self.new_id)
        self.loop = VirtualClockLoop()
        asyncio.set_event_loop(self.loop)
        self.dir = Path(tempfile.mkdtemp(prefix="vf-rollout-run-"))
        shutil.copy(store_template(), self.dir / "store.db")
        self.engine = self.run(open_engine(f"sqlite+aiosqlite:///{self.dir / 'store.db'}"))
        self.repo = Repo(self.engine)
        project = Project(name="fuzz", api_key="key", api_secret="secret" * 6)
        self.dispatch = DispatchService(project, DispatchSettings(), Metrics())
        self.runtime = FakeRuntime(self.dispatch)
        self.paths = Paths(self.dir)
        self.box = SecretBox(Fernet.generate_key())
        self.rooms = itertools.count(1)
        self.numbers = itertools.count(1)
        self.versions: list[str] = []
        # Jobs whose failure the machine caused: (job id, its re-dispatches then).
        self.allowed: set[tuple[str, int]] = set()
        self.callers: list[str] = []  # the jobs of callers' dispatches (not smoke sessions)
        self.served = False
        self.idle = True  # no rollout running, as of the last step
        self.crashed: dict[str, float] = {}  # when the machine last crashed a version's instance
        self.smoke_of: dict[str, str] = {}  # how each version's smoke sessions end
        self.reaper: asyncio.Task[None] | None = None
        self.fleet = Instances(
            self.repo,
            self.dispatch,
            self.runtime,
            self.box,
            self.paths,
            lambda: "ws://127.0.0.1:9",
            serving_timeout=SERVING_TIMEOUT,
        )
        self.rollouts = Rollouts(self.repo, self.dispatch, self.fleet)
        sizing = Sizing(self.repo, self.dispatch, self.fleet, self.rollouts)
        self.control = ControlPlane(
            self.repo, self.dispatch, self.fleet, self.rollouts, sizing, None, self.box, self.paths
        )

    def teardown(self) -> None:
        async def close() -> None:
            if self.reaper is not None:
                self.reaper.cancel()
            await self.rollouts.close()
            await self.fleet.close(leave_running=True)
            await self.dispatch.close()
            await self.engine.dispose()

        try:
            self.loop.run_until_complete(close())
        finally:
            for m, name, original in self._patched:
                setattr(m, name, original)
            self.loop.close()
            asyncio.set_event_loop(None)
            shutil.rmtree(self.dir, ignore_errors=True)

    def new_id(self, prefix: str) -> str:
        return f"{prefix}{next(self.ids):04d}"

    # -- the loop, the clock and the fake processes -------------------------------------------

    def run(self, aw: Awaitable[T]) -> T:
        async def wrapped() -> T:
            return await aw

        return self.loop.run_until_complete(wrapped())

    def call_soon(self, fn: Callable[[], T]) -> T:
        """`fn()` run in the loop (what it does may set timers or start tasks)."""

        async def call() -> T:
            return fn()

        return self.loop.run_until_complete(call())

    def tracked(self) -> list[asyncio.Task[Any]]:
        """Tasks that may wait on the store's thread: the loop alone cannot tell they will go
        on, so they are watched until each is done or waits for the clock."""
        tasks = [*self.rollouts._tasks, *self.fleet._writes]
        if self.reaper is not None:
            tasks.append(self.reaper)
        return tasks

    def waiter(self, task: asyncio.Future[Any]) -> asyncio.Future[Any] | None:
        """What `task` waits on, innermost (None: it is done, or about to run)."""
        while isinstance(task, asyncio.Task) and not task.done():
            inner = task._fut_waiter  # type: ignore[attr-defined]
            if inner is None:
                return None
            task = inner
        return None if task.done() else task

    def waits_for_time(self, task: asyncio.Task[Any]) -> bool:
        waiter = self.waiter(task)
        if waiter is None:
            return task.done()
        timers = self.loop._scheduled  # type: ignore[attr-defined]
        return any(
            not t.cancelled() and t._args and t._args[0] is waiter  # asyncio.sleep's timer
            for t in timers
        )

    def wait_for_store(self, tasks: list[asyncio.Task[Any]]) -> None:
        """Until one of `tasks` gets what it waits on (the store's thread wakes the loop when
        it hands a result back); a task that waits on anything else fails the run."""
        waiters = {w for t in tasks if (w := self.waiter(t)) is not None}
        if not waiters:
            return
        stuck = self.loop.create_future()
        watchdog = threading.Timer(30.0, self.loop.call_soon_threadsafe, [stuck.set_result, 1])
        watchdog.start()
        try:
            self.loop.run_until_complete(
                asyncio.wait({*waiters, stuck}, return_when=asyncio.FIRST_COMPLETED)
            )
        finally:
            watchdog.cancel()
        assert not stuck.done(), f"a rollout waits on something other than time: {tasks}"

    def settle(self) -> None:
        """Run everything that can run now: ready callbacks, store writes, the fake workers'
        answers; until the rollouts, the reaper and the store writes all wait for the clock."""
        while True:
            self.loop.run_until_complete(asyncio.sleep(0))
            if self.workers_act() or self.loop.busy():
                continue
            working = [t for t in self.tracked() if not self.waits_for_time(t)]
            if not working:
                return
            self.wait_for_store(working)

    def advance(self, seconds: float) -> None:
        """Time passes: the clock jumps from timer to timer, each run in its turn."""
        self.settle()  # what is under way first: its timers count from now
        end = self.loop.now + seconds
        while True:
            self.loop.now = min(end, self.loop.next_timer())
            self.settle()
            if self.loop.now >= end:
                return

    def workers_act(self) -> bool:
        """Each fake worker takes what it was sent: accepts every offer, reports every job it
        is given running (a smoke session also ended, as its version's smoke test goes)."""
        acted = False
        for p in self.runtime.processes():
            w = p.worker
            while w is not None and not w.outbox.empty():
                acted = True
                msg = agent.ServerMessage()
                msg.ParseFromString(w.outbox.get_nowait())
                which = msg.WhichOneof("message")
                if which == "availability":
                    answer = agent.AvailabilityResponse(
                        job_id=msg.availability.job.id,
                        available=True,
                        participant_identity=f"agent-{w.id}",
                    )
                    self.send(w, agent.WorkerMessage(availability=answer))
                elif which == "assignment":
                    job = msg.assignment.job
                    self.job_status(w, job.id, agent.JobStatus.JS_RUNNING)
                    if job.room.name.startswith("vf-smoke-"):
                        smoke = self.smoke_of.get(p.state.spec.version, "pass")
                        if smoke == "pass":
                            self.job_status(w, job.id, agent.JobStatus.JS_SUCCESS)
                        elif smoke == "fail":
                            self.job_status(w, job.id, agent.JobStatus.JS_FAILED)
        if self.call_soon(self.runtime.exit_drained):
            acted = True
        return acted

    def send(self, w: Worker, msg: agent.WorkerMessage) -> None:
        self.call_soon(lambda: _handle(self.dispatch, w, msg))

    def job_status(self, w: Worker, job_id: str, status: int) -> None:
        update = agent.UpdateJobStatus(job_id=job_id, status=status)  # type: ignore[arg-type]
        self.send(w, agent.WorkerMessage(update_job=update))

    # -- what the machine reads ---------------------------------------------------------------

    def dep(self) -> DeploymentRow:
        dep = self.run(self.repo.deployment(self.agent.id, DEP))
        assert dep is not None
        return dep

    def running(self) -> list[RolloutRow]:
        return self.run(self.repo.rollouts(self.agent.id, list(RUNNING)))

    def weights(self) -> dict[str, float]:
        return self.dispatch.weights(self.agent.name, DEP) or {}

    def serving_instances(self, version: str) -> list[str]:
        """Live instances of `version` that take sessions: not retiring, not draining, ready,
        their worker registered and accepting."""
        rows = self.run(self.repo.instances(self.agent.id, LIVE))
        out = []
        for row in rows:
            if row.version != version or row.deployment != DEP:
                continue
            p = self.runtime.process(row.id)
            if (
                p.worker is not None
                and p.state.status == InstanceStatus.READY
                and self.dispatch.instance(row.id).accepting
            ):
                out.append(row.id)
        return out

    def serves(self, version: str) -> bool:
        """`version` has a serving instance; or the machine crashed one of its instances a
        moment ago (a restart's backoff and start) and another is coming up meanwhile."""
        if self.serving_instances(version):
            return True
        if self.loop.now - self.crashed.get(version, -math.inf) > BACKOFF + STARTUP + 0.1:
            return False
        coming = [
            p
            for p in self.runtime.processes()
            if p.state.spec.version == version and not (p.gone or p.draining or p.stopping)
        ]
        return bool(coming)

    def open_calls(self) -> list[tuple[Worker, Job]]:
        out = []
        for p in self.runtime.processes():
            if p.worker is None:
                continue
            for job_id in sorted(p.worker.jobs):
                job = self.dispatch.book.jobs[job_id]
                if job_id in self.callers and job.state == JobState.RUNNING:
                    out.append((p.worker, job))
        return out

    def ready_processes(self) -> list[FakeProcess]:
        return [
            p
            for p in self.runtime.processes()
            if p.worker is not None and not p.gone and not p.down
        ]

    # -- the agent and its first version ------------------------------------------------------

    @initialize(keep_warm=st.sampled_from([0.0, 1e9]))
    def first_version(self, keep_warm: float) -> None:
        """An agent serving v1 on one instance; retired instances are kept warm for a
        rollback (keep_warm) or drained as soon as they are idle (0)."""
        self.fleet.keep_warm = keep_warm
        self.agent: AgentRow = self.run(self.control.create_agent("fake", grace_period=GRACE))
        self.reaper = self.loop.create_task(self.fleet.reap_retired(REAP_INTERVAL))
        version = self.new_version()
        self.run(self.control.roll_to(self.agent, DEP, version))
        self.advance(STARTUP + 1.0)
        assert self.dep().version == version and not self.running()
        self.served = True

    def new_version(self) -> str:
        number = next(self.numbers)
        version = f"v{number}"
        row = VersionRow(
            agent_id=self.agent.id,
            version=version,
            number=number,
            status="ready",
            source_digest="0" * 64,
            python="/nonexistent/python",
            created_at=time.time(),
            built_at=time.time(),
        )
        self.run(self.repo.save(row))
        self.versions.append(version)
        return version

    # -- the operator -------------------------------------------------------------------------

    # A version that serves, or never does: it crashes as it starts, or never registers.
    BROKEN = st.sampled_from(["", "", "", "crash", "hang"])

    @rule(broken=BROKEN)
    def deploy_rolling(self, broken: str) -> None:
        self.deploy(Rolling(), broken)

    @rule(broken=BROKEN, smoke=st.sampled_from(["pass", "pass", "fail", "hang"]))
    def deploy_bluegreen(self, broken: str, smoke: str) -> None:
        """Blue-green whose smoke sessions succeed, fail, or never end (its timeout)."""
        self.deploy(BlueGreen(SMOKE), broken, smoke)

    @rule(
        broken=BROKEN,
        steps=st.lists(st.sampled_from([10.0, 25.0, 50.0, 100.0]), min_size=1, unique=True),
        interval=st.sampled_from([0.0, 1.0, 5.0, 30.0]),
        min_sessions=st.sampled_from([0, 1, 3]),
        then=st.sampled_from([0.0, STARTUP + 0.1]),
    )
    def deploy_canary(
        self, broken: str, steps: list[float], interval: float, min_sessions: int, then: float
    ) -> None:
        """A canary; `then`: time for its instances to come up, so that the next rules
        (calls, commands, crashes) find it at its first step."""
        thresholds = Thresholds(min_sessions=min_sessions)
        self.deploy(CanaryPlan(tuple(sorted(steps)), interval, thresholds), broken)
        self.advance(then)

    @precondition(lambda self: len(self.versions) > 1)
    @rule(data=st.data(), canary=st.booleans(), smoke=st.sampled_from(["pass", "fail"]))
    def deploy_kept(self, data: st.DataObject, canary: bool, smoke: str) -> None:
        """A kept version rolled out again with a strategy (`POST .../rollouts`): its retired
        instances, warm, are taken back with the sessions they still run."""
        serving = self.dep().version
        version = data.draw(st.sampled_from([v for v in self.versions if v != serving]))
        self.smoke_of[version] = smoke
        plan: Plan = CanaryPlan((50.0, 100.0), 1.0, Thresholds(min_sessions=0))
        if not canary:
            plan = BlueGreen(SMOKE)
        note(f"deploy {plan.strategy} of a kept version")
        self.roll(lambda: self.control.roll_to(self.agent, DEP, version, plan=plan))

    def deploy(self, plan: Plan, broken: str, smoke: str = "pass") -> None:
        """A new version, rolled out: refused only while another rollout runs."""
        version = self.new_version()
        if broken:
            self.runtime.broken[version] = broken
        self.smoke_of[version] = smoke
        note(f"deploy {plan.strategy}{' of a broken version' if broken else ''}")
        self.roll(lambda: self.control.roll_to(self.agent, DEP, version, plan=plan))

    def roll(self, start: Callable[[], Awaitable[RolloutRow]]) -> None:
        """Start a rollout: it must be refused if and only if one is running (and say which)."""
        running = self.running()
        try:
            self.run(start())
        except InvalidRequest as e:
            assert running, f"refused with no rollout running: {e}"
            assert running[0].id in str(e), f"the refusal does not name the rollout: {e}"
            note("refused: a rollout is running")
        else:
            assert not running, f"accepted while {running[0].id} runs"
        self.settle()

    @precondition(lambda self: len(self.versions) > 1)
    @rule(data=st.data())
    def rollback(self, data: st.DataObject) -> None:
        """Back to any kept version (all are ready in the store): accepted whenever no rollout
        is running."""
        serving = self.dep().version
        to = data.draw(st.sampled_from([v for v in self.versions if v != serving]))
        note("rollback")
        self.roll(lambda: self.control.rollback(self.agent, DEP, to))

    @precondition(lambda self: self.idle)  # refused otherwise, as any rollout (`deploy`)
    @rule()
    def restart(self) -> None:
        note("restart")
        self.roll(lambda: self.control.restart(self.agent, DEP))

    @rule(replicas=st.integers(1, 3))
    def scale(self, replicas: int) -> None:
        """A fixed size: refused only while a rollout runs (its sizes are its own)."""
        running = self.running()
        try:
            self.run(self.control.scale(self.agent, DEP, replicas=replicas))
        except InvalidRequest as e:
            assert running, f"scale refused with no rollout running: {e}"
        else:
            assert not running, "scaled while a rollout runs"
            note("scaled")
        self.settle()

    @rule(command=st.sampled_from(["pause", "resume", "promote", "abort"]))
    def canary_command(self, command: str) -> None:
        running = [r for r in self.running() if r.strategy == "canary"]
        try:
            self.run(self.rollouts.command(self.agent, DEP, command))
        except InvalidRequest as e:
            assert not running or running[0].step == "promote", f"{command} refused: {e}"
        else:
            assert running, f"{command} accepted with no canary running"
            note(f"canary {command}")
        self.settle()

    # -- callers and instances ----------------------------------------------------------------

    @rule(n=st.integers(1, 4))
    def call(self, n: int) -> None:
        """Callers' sessions, dispatched to the agent's deployment (routed by weight)."""
        for _ in range(n):
            room = f"room{next(self.rooms)}"

            async def create(room: str = room) -> None:
                d = self.dispatch.create_dispatch(agent_name="fake", room=room, deployment=DEP)
                self.callers.extend(d.job_ids)

            self.run(create())
        note("calls")
        self.settle()

    @precondition(lambda self: self.open_calls())
    @rule(data=st.data(), ok=st.booleans())
    def hang_up(self, data: st.DataObject, ok: bool) -> None:
        """A session ends: the call is over (or the agent's code failed it)."""
        worker, job = data.draw(st.sampled_from(self.open_calls()))
        if not ok:
            self.allowed.add((job.id, job.redispatches))
        status = agent.JobStatus.JS_SUCCESS if ok else agent.JobStatus.JS_FAILED
        self.job_status(worker, job.id, status)
        note("a call ended")
        self.settle()

    def hang_up_all(self) -> None:
        for worker, job in self.open_calls():
            self.job_status(worker, job.id, agent.JobStatus.JS_SUCCESS)
        self.settle()

    @precondition(lambda self: self.ready_processes())
    @rule(data=st.data())
    def crash(self, data: st.DataObject) -> None:
        """An instance's process dies (mostly one with sessions); the runtime starts it again."""
        ready = self.ready_processes()
        busy = [p for p in ready if p.worker and p.worker.jobs]
        self.crash_process(data.draw(st.sampled_from(busy or ready)))

    def crash_process(self, p: FakeProcess) -> None:
        self.crashed[p.state.spec.version] = self.loop.now
        for job_id in self.call_soon(lambda: self.runtime.crash(p)):
            self.allowed.add((job_id, self.dispatch.book.jobs[job_id].redispatches))
        note("crash")
        self.settle()

    @rule(seconds=st.sampled_from([0.1, 0.5, 1.0, 3.0, 10.0, 60.0]), calls=st.integers(0, 2))
    def wait(self, seconds: float, calls: int) -> None:
        """Time passes, and callers call meanwhile."""
        if calls:
            self.call(calls)
        self.advance(seconds)

    @rule(promote=st.booleans())
    def quiesce(self, promote: bool) -> None:
        """Nothing new happens for a long while: every rollout ends, but a canary waiting for
        its operator (paused, holding its last step, or for sessions to judge it), which ends
        once told to promote or abort."""
        self.advance(QUIESCE)
        for rollout in self.running():
            why = self.waits_for_operator(rollout)
            assert why, (
                f"rollout {rollout.strategy} to {rollout.to_version} stuck at {rollout.step} "
                f"({rollout.state})"
            )
            note(f"quiesced: a canary {why}")
            command = "promote" if promote else "abort"
            self.run(self.rollouts.command(self.agent, DEP, command))
            self.advance(QUIESCE)
        still = self.running()
        assert not still, f"{[(r.to_version, r.step) for r in still]} did not end when told"

    def waits_for_operator(self, rollout: RolloutRow) -> str:
        """Why a canary that is not ending holds by design (empty: it does not)."""
        if rollout.strategy != "canary" or not rollout.step.startswith("step:"):
            return ""
        plan = parse_plan(rollout.plan)
        assert isinstance(plan, CanaryPlan)
        index = int(rollout.step.split(":")[1])
        if rollout.state == RolloutState.PAUSED:
            return "paused"
        if index == len(plan.steps) - 1 and plan.steps[index] < 100:
            return "holding its last step for promote"
        seen = self.dispatch.window(self.agent.name, rollout.to_version, rollout.step_started_at)
        if seen.ended < plan.thresholds.min_sessions:
            return "waiting for sessions to judge it"
        return ""

    # -- invariants ---------------------------------------------------------------------------

    @invariant()
    def never_zero_serving_instances(self) -> None:
        if not self.served:
            return
        dep = self.dep()
        assert dep.replicas >= 1
        assert self.serves(dep.version), f"nothing serves {dep.version}"

    @invariant()
    def no_session_cut(self) -> None:
        assert not self.runtime.cuts, self.runtime.cuts
        for job_id in self.callers:
            job = self.dispatch.book.jobs[job_id]
            if job.state in ENDED and job.state != JobState.SUCCEEDED:
                assert (job_id, job.redispatches) in self.allowed, (
                    f"session {job_id} cut: {job.state} ({job.error})"
                )

    @invariant()
    def weights_sum_to_100_over_serving_versions(self) -> None:
        if not self.served:
            return
        weights = self.weights()
        assert math.isclose(sum(weights.values()), 100.0), weights
        for version, weight in weights.items():
            if weight > 0:
                assert self.serves(version), f"{weights}: {version} has no instance"

    @invariant()
    def idle_routing_is_the_last_rollouts_outcome(self) -> None:
        """With no rollout running, new sessions go to the version the store says serves, and
        that is what the last rollout left: its version if it served, else the one before."""
        self.idle = not self.running()
        if not self.served or not self.idle:
            return
        dep = self.dep()
        assert self.weights() == {dep.version: 100}, (self.weights(), dep.version)
        last = self.run(self.repo.rollouts(self.agent.id, limit=1))[0]
        expected = last.to_version if last.state in SERVED else last.from_version
        assert dep.version == expected, f"{last.state} {last.to_version}: serves {dep.version}"
        note(f"last rollout {last.strategy} {last.state}")

    @invariant()
    def retired_instances_take_no_sessions(self) -> None:
        """Instances on their way out (retiring, draining) are never routed new sessions: a
        retiring one's version has no weight, or its worker takes nothing."""
        weights = self.weights()
        rows = self.run(
            self.repo.instances(self.agent.id, [Lifecycle.RETIRING, Lifecycle.DRAINING])
        )
        for row in rows:
            p = self.runtime.process(row.id)
            if p.worker is None or not self.dispatch.instance(row.id).accepting:
                continue
            assert weights.get(row.version, 0) == 0, f"{row.status} {row.id} takes sessions"


def check(m: RolloutMachine) -> None:
    m.never_zero_serving_instances()
    m.no_session_cut()
    m.weights_sum_to_100_over_serving_versions()
    m.idle_routing_is_the_last_rollouts_outcome()
    m.retired_instances_take_no_sessions()


@contextlib.contextmanager
def machine(keep_warm: float = 1e9) -> Iterator[RolloutMachine]:
    """A machine serving v1, for a sequence of its rules written out (a seed of the fuzzing:
    each run replays these, whatever the generator then draws); the invariants checked after
    each step by `step`, and at the end."""
    m = RolloutMachine()
    try:
        m.first_version(keep_warm)
        yield m
        check(m)
    finally:
        m.teardown()


def test_seed_a_canary_with_calls_on_both_versions_is_promoted_and_cuts_none() -> None:
    with machine() as m:
        m.scale(2)
        m.call(4)
        m.deploy_canary("", [50.0], interval=1.0, min_sessions=1, then=0.0)
        m.advance(STARTUP + 1.0)
        check(m)
        assert m.weights() == {"v1": 50, "v2": 50}
        m.call(4)
        versions = {job.version for _, job in m.open_calls()}
        assert versions == {"v1", "v2"}, versions
        m.canary_command("promote")
        m.advance(STARTUP + 2.0)
        check(m)
        assert m.dep().version == "v2" and m.weights() == {"v2": 100}
        assert len(m.open_calls()) == 8  # the v1 calls go on on retired instances
        m.quiesce(promote=True)


def test_seed_an_aborted_canary_drains_its_instances_and_their_calls_go_on() -> None:
    with machine() as m:
        m.call(4)
        m.deploy_canary("", [50.0, 100.0], interval=30.0, min_sessions=0, then=0.0)
        m.advance(STARTUP + 1.0)
        m.call(6)
        assert {job.version for _, job in m.open_calls()} == {"v1", "v2"}
        m.canary_command("abort")
        m.advance(1.0)
        check(m)
        assert m.weights() == {"v1": 100} and len(m.open_calls()) == 10
        m.hang_up_all()
        m.advance(1.0)
        assert {p.state.spec.version for p in m.ready_processes()} == {"v1"}


def test_seed_a_bluegreen_whose_smoke_sessions_hang_leaves_blue_serving_its_calls() -> None:
    with machine() as m:
        m.call(2)
        m.deploy_bluegreen("", "hang")
        m.advance(STARTUP + SMOKE.timeout + 2.0)
        check(m)
        (last,) = m.run(m.repo.rollouts(m.agent.id, limit=1))
        assert last.state == RolloutState.ABORTED and "smoke test" in last.reason
        assert len(m.open_calls()) == 2 and m.dep().version == "v1"


def test_seed_a_rollback_takes_back_warm_instances_with_their_calls() -> None:
    with machine(keep_warm=1e9) as m:
        m.call(3)
        m.deploy_rolling("")
        m.advance(STARTUP + 1.0)
        assert m.dep().version == "v2"
        m.roll(lambda: m.control.rollback(m.agent, DEP, "v1"))
        m.advance(1.0)
        check(m)
        assert m.dep().version == "v1" and len(m.open_calls()) == 3
        warm = m.run(m.repo.instances(m.agent.id, LIVE))
        assert [r.version for r in warm].count("v1") == 1  # taken back, none started


def test_seed_versions_that_never_come_up_leave_the_calls_where_they_are() -> None:
    with machine(keep_warm=0.0) as m:
        m.call(2)
        for strategy in ("rolling", "bluegreen", "canary"):
            for broken in ("crash", "hang"):
                if strategy == "rolling":
                    m.deploy_rolling(broken)
                elif strategy == "bluegreen":
                    m.deploy_bluegreen(broken, "pass")
                else:
                    m.deploy_canary(broken, [25.0, 100.0], interval=0.0, min_sessions=0, then=0.0)
                m.advance(SERVING_TIMEOUT + 1.0)
                check(m)
                assert m.dep().version == "v1" and not m.running()
        assert len(m.open_calls()) == 2


def test_seed_a_crash_of_the_only_instance_then_scaling_up_and_down() -> None:
    """Scaling down drains the instance coming back from its crash or the one just started:
    either way one comes up (the machine once took this for nothing serving)."""
    with machine(keep_warm=0.0) as m:
        (p,) = m.ready_processes()
        m.crash_process(p)
        m.scale(2)
        m.scale(1)
        check(m)
        m.advance(BACKOFF + STARTUP)
        assert len(m.serving_instances("v1")) == 1


def test_seed_a_crash_mid_rollout_of_the_only_instance() -> None:
    with machine() as m:
        m.call(1)
        m.deploy_rolling("")
        (p,) = m.ready_processes()
        m.crash_process(p)
        check(m)
        m.quiesce(promote=False)


def test_an_instance_a_rollback_takes_back_is_not_drained_by_a_reaper_that_read_it_retired() -> (
    None
):
    """The reaper reads the retired instances, then drains those idle past `keep_warm`; a
    rollback that took one of them back (serving again) in between had it drained anyway, and
    the deployment served its version with no instance. The machine's clock never interleaves
    the two (each runs at its own moment), so the moment is held here: the reaper waits, once
    it has read the instances, until the rollback is done."""
    with machine(keep_warm=0.0) as m:
        assert m.reaper is not None
        m.reaper.cancel()  # a reaper of this test's own, held after its read
        m.reaper = None
        m.call(1)
        m.deploy_rolling("")
        m.advance(STARTUP + 1.0)
        m.hang_up_all()
        assert m.dep().version == "v2"
        gate = asyncio.Event()
        reaper = m.loop.create_task(m.fleet.reap_retired(REAP_INTERVAL))
        read_agent = m.repo.agent

        async def held(key: str) -> AgentRow | None:
            if asyncio.current_task() is reaper:
                await gate.wait()
            return await read_agent(key)

        m.repo.agent = held  # type: ignore[method-assign]
        m.advance(REAP_INTERVAL)  # the reaper has read v1's instance retired, and waits
        m.roll(lambda: m.control.rollback(m.agent, DEP, "v1"))
        m.advance(1.0)
        assert m.dep().version == "v1" and not m.running()
        m.reaper = reaper
        gate.set()
        m.settle()
        check(m)


TestRollouts = RolloutMachine.TestCase
# The loaded profile's (tests/conftest.py): fewer, shorter runs than the dispatcher's, each
# step a few store writes; bounded to well under a minute on a loaded two-core machine.
_profile = settings()
TestRollouts.settings = settings(
    _profile, max_examples=max(10, _profile.max_examples // 4), stateful_step_count=25
)
