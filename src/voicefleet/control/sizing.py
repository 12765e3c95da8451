"""Sizing a deployment: how many instances of its serving version run, and which go first.

Used by `vf agent scale` (through the control plane) and by the autoscaler, which is handed this
object as its `Pools`; both resize under the deployment's lock, which a rollout holds while it
runs.
"""

from __future__ import annotations

import asyncio
import time

from voicefleet.autoscale.loop import instance_signals
from voicefleet.autoscale.policy import pick_victims
from voicefleet.dispatch.service import DispatchService
from voicefleet.fleet import Instances, Target
from voicefleet.rollout.runner import Rollouts
from voicefleet.store.models import AgentRow, DeploymentRow, InstanceRow
from voicefleet.store.repo import Repo


class Sizing:
    def __init__(
        self, repo: Repo, dispatch: DispatchService, fleet: Instances, rollouts: Rollouts
    ) -> None:
        self.repo = repo
        self.dispatch = dispatch
        self.fleet = fleet
        self.rollouts = rollouts

    def lock(self, agent_id: str, deployment: str) -> asyncio.Lock:
        """One change to a deployment's instances at a time (see `Rollouts.lock`)."""
        return self.rollouts.lock(agent_id, deployment)

    async def serving_instances(self, agent: AgentRow, dep: DeploymentRow) -> list[str]:
        """Ids of the live instances of the version `dep` serves."""
        return [r.id for r in await self._serving(agent, dep)]

    async def _serving(self, agent: AgentRow, dep: DeploymentRow) -> list[InstanceRow]:
        return [
            r
            for r in await self.fleet.live(agent.id)
            if r.deployment == dep.name and r.version == dep.version
        ]

    async def resize(self, agent: AgentRow, dep: DeploymentRow, n: int) -> list[str]:
        """Run `n` instances of the deployment's version (under `lock(agent, deployment)`).
        Going down drains idle instances first; an instance with sessions drains (they finish),
        it is never cut. Returns the instances started or drained."""
        dep.replicas, dep.updated_at = n, time.time()
        await self.repo.save(dep)
        if not dep.version:
            return []
        live = await self._serving(agent, dep)
        if n > len(live):
            target = Target.of(agent, dep.name)
            kept = await self.fleet.ensure(target, dep.version, None, n)
            return [i for i in kept if i not in {r.id for r in live}]
        signals = instance_signals(self.dispatch, [r.id for r in live])
        victims = pick_victims(signals, len(live) - n)
        for victim in victims:
            row = next(r for r in live if r.id == victim.id)
            await self.fleet.drain_row(row, agent.grace_period)
        return [v.id for v in victims]
