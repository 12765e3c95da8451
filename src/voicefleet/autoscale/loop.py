"""The one loop that applies autoscaling decisions.

Every second (and at once when a session is queued for an agent, so a scaled-to-zero agent starts
its first instance without waiting for the tick) it samples each autoscaled deployment's
instances from the dispatcher's registry (the load and sessions their workers report, plus the
agent's queued jobs), asks `policy.decide`, and resizes through the control plane: new instances
start at once; going down, idle instances drain first and busy ones are only ever drained.
A deployment in the middle of a rollout is left alone until the rollout ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import TYPE_CHECKING

from voicefleet.autoscale.policy import Decision, Policy, Sample, decide

if TYPE_CHECKING:
    from voicefleet.control.service import ControlPlane
    from voicefleet.store.models import AgentRow, DeploymentRow

log = logging.getLogger("voicefleet.autoscale")


class Autoscaler:
    def __init__(self, plane: ControlPlane, interval: float = 1.0) -> None:
        self.plane = plane
        self.interval = interval
        self.samples: dict[tuple[str, str], deque[Sample]] = {}
        self.decisions: dict[tuple[str, str], tuple[float, Decision]] = {}
        self._wake = asyncio.Event()
        plane.dispatch.scheduler.on_queued(lambda _agent_name: self._wake.set())

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("autoscaler tick failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()

    async def tick(self) -> None:
        plane = self.plane
        queued = plane.dispatch.scheduler.queued_by_agent()
        now = time.time()
        for dep in await plane.repo.deployments():
            if dep.autoscale is None or not dep.version:
                continue
            agent = await plane.repo.agent(dep.agent_id)
            lock = plane.lock(dep.agent_id, dep.name)
            if agent is None or lock.locked():
                continue  # a rollout is under way: its sizes are its own
            async with lock:
                # Read again: a rollout may have ended (and changed the version) since the list.
                fresh = await plane.repo.deployment(agent.id, dep.name)
                if fresh is not None and fresh.autoscale is not None and fresh.version:
                    await self._scale(plane, agent, fresh, queued.get(agent.name, 0), now)

    async def _scale(
        self, plane: ControlPlane, agent: AgentRow, dep: DeploymentRow, queued: int, now: float
    ) -> None:
        assert dep.autoscale is not None
        policy = Policy.from_dict(dep.autoscale)
        rows = [
            r
            for r in await plane.instances.live(agent.id)
            if r.deployment == dep.name and r.version == dep.version
        ]
        key = (agent.id, dep.name)
        history = self.samples.setdefault(key, deque())
        history.append(Sample(now, tuple(plane.instances.signals(rows)), queued))
        keep = max(policy.up_window, policy.down_window, policy.idle_to_zero or 0) + 5
        while history and history[0].at < now - keep:
            history.popleft()
        decision = decide(policy, history, len(rows))
        self.decisions[key] = (now, decision)
        if decision.desired == len(rows):
            return
        changed = await plane.resize(agent, dep, decision.desired)
        verb = "up" if decision.desired > len(rows) else "down"
        await plane.repo.event(
            agent.id,
            f"autoscaled_{verb}",
            f"{dep.name}: {len(rows)} -> {decision.desired} instance(s): {decision.reason}"
            + (f" ({', '.join(changed)})" if changed else ""),
        )
        log.info(
            "autoscaled", extra={"agent": agent.name, "from": len(rows), "to": decision.desired}
        )

    def decision(self, agent_id: str, deployment: str) -> dict[str, object] | None:
        found = self.decisions.get((agent_id, deployment))
        if found is None:
            return None
        at, d = found
        return {"at": at, "desired": d.desired, "wanted": d.wanted, "reason": d.reason}
