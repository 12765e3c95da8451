"""The rollout runner and its strategies, in-process: a real store (SQLite in tmp_path) and a
real dispatcher (no sockets) around `FakeFleet`, which keeps instances as records and starts
no process. A verdict on rollout logic in about a second."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from voicefleet.config import DispatchSettings, Project
from voicefleet.dispatch.service import DispatchService
from voicefleet.errors import InvalidRequest
from voicefleet.fleet import LIVE, Lifecycle, NotServing, Paths, Target
from voicefleet.metrics import Metrics
from voicefleet.rollout.bluegreen import BlueGreen
from voicefleet.rollout.canary import CanaryPlan
from voicefleet.rollout.model import Fleet, RolloutState
from voicefleet.rollout.plans import Plan, parse_plan
from voicefleet.rollout.rolling import Rolling
from voicefleet.rollout.runner import STRATEGIES, Rollouts
from voicefleet.rollout.smoke import SmokeTest
from voicefleet.store.db import open_engine
from voicefleet.store.models import AgentRow, DeploymentRow, InstanceRow, RolloutRow
from voicefleet.store.repo import Repo

AGENT = AgentRow(id="CA_fake", name="fake", grace_period=60.0, created_at=0.0)


@dataclass
class FakeFleet:
    """Instances as records, kept in memory: `ensure` makes them, `wait_serving` passes unless
    told that a version does not come up. Satisfies `voicefleet.rollout.model.Fleet`."""

    paths: Paths
    broken: set[str] = field(default_factory=set)  # versions whose instances never serve
    rows: dict[str, InstanceRow] = field(default_factory=dict)
    gave_up: list[str] = field(default_factory=list)
    drained: list[str] = field(default_factory=list)
    error: Exception | None = None  # raised by `ensure`: the fleet broke, not the version

    def add(self, version: str, status: str = Lifecycle.READY) -> str:
        instance_id = f"i-{version}-{len(self.rows)}"
        self.rows[instance_id] = InstanceRow(
            id=instance_id,
            agent_id=AGENT.id,
            deployment="production",
            version=version,
            status=status,
            created_at=time.time(),
            updated_at=time.time(),
        )
        return instance_id

    def of(self, version: str, *statuses: str) -> list[str]:
        return [r.id for r in self.rows.values() if r.version == version and r.status in statuses]

    async def ensure(
        self, target: Target, version: str, fresh_since: float | None, want: int
    ) -> list[str]:
        if self.error is not None:
            raise self.error
        have = self.of(version, *LIVE)[: max(want, 1)]
        while len(have) < want:
            have.append(self.add(version))
        return have

    async def wait_serving(self, instance_ids: list[str]) -> None:
        for i in instance_ids:
            if self.rows[i].version in self.broken:
                raise NotServing(f"instance {i} crashed while starting")

    async def retire_others(
        self, target: Target, serving: str, keep: list[str], warm: bool
    ) -> list[str]:
        out = []
        for row in self.rows.values():
            if row.status in LIVE and row.id not in keep:
                warm_retire = warm and row.version != serving
                row.status = Lifecycle.RETIRING if warm_retire else Lifecycle.DRAINING
                out.append(row.id)
        return out

    async def give_up(
        self, target: Target, serving: str, instance_ids: list[str], since: float
    ) -> None:
        self.gave_up.extend(instance_ids)
        for i in instance_ids:
            self.rows[i].status = Lifecycle.STOPPED

    async def drain(self, instance_ids: list[str]) -> None:
        self.drained.extend(instance_ids)
        for i in instance_ids:
            self.rows[i].status = Lifecycle.DRAINING

    async def live(self, agent_id: str) -> list[InstanceRow]:
        return [r for r in self.rows.values() if r.status in LIVE]

    def restarts(self, instance_ids: list[str]) -> int:
        return 0

    def poll_logs(self) -> None:
        pass

    def http_url(self) -> str:
        return "http://127.0.0.1:9"


@dataclass
class Rig:
    repo: Repo
    dispatch: DispatchService
    fleet: FakeFleet
    rollouts: Rollouts

    async def roll(self, plan: Plan, to: str = "v2", serving: str = "v1") -> RolloutRow:
        """Record a rollout of `to` over `serving` (one instance of it), run it to its end."""
        self.fleet.add(serving)
        self.dispatch.set_weights(AGENT.name, {serving: 100}, "production")
        rollout = RolloutRow(
            id=f"RO_{to}",
            agent_id=AGENT.id,
            deployment="production",
            from_version=serving,
            to_version=to,
            strategy=plan.strategy,
            state=RolloutState.PROGRESSING,
            step="",
            reason="deploy",
            plan={**plan.to_dict(), "replicas": 1},
            created_at=time.time(),
            updated_at=time.time(),
        )
        await self.repo.save(rollout)
        await asyncio.wait_for(self.rollouts.run(rollout), 10)
        return rollout

    async def serving(self) -> str:
        dep = await self.repo.deployment(AGENT.id, "production")
        assert dep is not None
        return dep.version

    def weights(self) -> dict[str, float] | None:
        return self.dispatch.weights(AGENT.name, "production")


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    engine = await open_engine(f"sqlite+aiosqlite:///{tmp_path / 'store.db'}")
    repo = Repo(engine)
    await repo.save(
        AgentRow(id=AGENT.id, name=AGENT.name, grace_period=60.0, created_at=0.0),
        DeploymentRow(
            agent_id=AGENT.id, name="production", version="v1", replicas=1, updated_at=0.0
        ),
    )
    dispatch = DispatchService(Project("test", "key", "secret"), DispatchSettings(), Metrics())
    fleet = FakeFleet(Paths(tmp_path))
    rollouts = Rollouts(repo, dispatch, fleet)
    yield Rig(repo, dispatch, fleet, rollouts)
    await rollouts.close()
    await dispatch.close()
    await engine.dispose()


def test_the_fake_fleet_is_a_fleet(tmp_path: Path) -> None:
    fleet: Fleet = FakeFleet(Paths(tmp_path))  # type-checked: the fake keeps to the port
    assert fleet.http_url()


def test_every_plan_has_a_strategy_of_its_name() -> None:
    plans = [
        parse_plan(None),
        parse_plan({"strategy": "canary"}),
        parse_plan({"strategy": "bluegreen"}),
    ]
    assert [type(p) for p in plans] == [Rolling, CanaryPlan, BlueGreen]
    assert sorted(STRATEGIES) == sorted(p.strategy for p in plans)


def test_a_plan_is_parsed_once_with_its_defaults_and_survives_the_store() -> None:
    plan = parse_plan({"strategy": "canary", "steps": [5, 100]})
    assert isinstance(plan, CanaryPlan)
    assert plan.steps == (5.0, 100.0) and plan.interval == 300.0
    assert parse_plan({**plan.to_dict(), "replicas": 3}) == plan  # as read back from a row
    bluegreen = parse_plan({"strategy": "bluegreen", "smoke": {"sessions": 2}})
    assert bluegreen == BlueGreen(SmokeTest(sessions=2))


@pytest.mark.parametrize(
    "data",
    [
        {"strategy": "blue"},
        {"strategy": "canary", "steps": [50, 10]},
        {"strategy": "bluegreen", "smoke": {"x": 1}},
    ],
)
def test_a_bad_plan_is_refused_with_why(data: dict[str, object]) -> None:
    with pytest.raises(InvalidRequest):
        parse_plan(data)


async def test_rolling_shifts_every_new_session_then_retires_the_old_version(rig: Rig) -> None:
    rollout = await rig.roll(Rolling())
    assert (rollout.state, rollout.step) == (RolloutState.COMPLETE, "done")
    assert await rig.serving() == "v2"
    assert rig.weights() == {"v2": 100}
    assert rig.fleet.of("v1", Lifecycle.RETIRING) and rig.fleet.of("v2", *LIVE)


async def test_rolling_to_a_version_that_never_serves_aborts_and_leaves_the_old_one(
    rig: Rig,
) -> None:
    rig.fleet.broken.add("v2")
    rollout = await rig.roll(Rolling())
    assert (rollout.state, rollout.step) == (RolloutState.ABORTED, "wait")
    assert "crashed while starting" in rollout.reason
    assert await rig.serving() == "v1" and rig.weights() == {"v1": 100}
    assert rig.fleet.gave_up == rig.fleet.of("v2", Lifecycle.STOPPED)
    assert rig.fleet.of("v1", *LIVE)


async def test_bluegreen_switches_at_once_and_drains_blue_now(rig: Rig) -> None:
    rollout = await rig.roll(BlueGreen(SmokeTest(sessions=0)))
    assert rollout.state == RolloutState.COMPLETE, rollout.reason
    assert rig.weights() == {"v2": 100}
    assert rig.fleet.of("v1", Lifecycle.DRAINING)  # blue drains now, it is not kept warm


async def test_an_aborted_canary_sends_new_sessions_back_to_stable_and_drains(rig: Rig) -> None:
    plan = CanaryPlan(steps=(50.0,), interval=0.0)
    task = asyncio.create_task(rig.roll(plan))
    for _ in range(100):  # until the canary holds its (last) step
        row = await rig.repo.rollout("RO_v2")
        if row is not None and row.step == "step:0":
            break
        await asyncio.sleep(0.01)
    assert rig.weights() == {"v1": 50, "v2": 50}
    agent = await rig.repo.agent(AGENT.id)
    assert agent is not None
    await rig.rollouts.command(agent, "production", "abort")
    rollout = await task
    assert rollout.state == RolloutState.ABORTED
    assert "aborted by request" in rollout.reason
    assert rig.weights() == {"v1": 100}
    assert rig.fleet.drained == rig.fleet.of("v2", Lifecycle.DRAINING)


async def test_an_unknown_canary_command_is_refused(rig: Rig) -> None:
    agent = await rig.repo.agent(AGENT.id)
    assert agent is not None
    with pytest.raises(InvalidRequest, match="one of pause, resume, promote, abort"):
        await rig.rollouts.command(agent, "production", "faster")


async def test_a_rollout_that_breaks_is_aborted_and_settled_on_the_serving_version(
    rig: Rig,
) -> None:
    rig.fleet.error = RuntimeError("the store went away")
    rollout = await rig.roll(Rolling())
    assert rollout.state == RolloutState.ABORTED
    assert rollout.reason == "internal error: the store went away"
    assert rig.weights() == {"v1": 100}
