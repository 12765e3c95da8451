"""The one loop that applies autoscaling decisions.

Every second (and at once when a session is queued for an agent, so a scaled-to-zero agent starts
its first instance without waiting for the tick) it samples each autoscaled deployment's
instances from the dispatcher's registry (the load and sessions their workers report, plus the
agent's queued jobs), asks `policy.decide`, and resizes through the control plane: new instances
start at once; going down, idle instances drain first and busy ones are only ever drained.
A deployment in the middle of a rollout is left alone until the rollout ends. A version whose
recent sessions mostly fail (the dispatcher's per-version stats) is not scaled up: an
`autoscale_held` event says so once, until it stops failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import TYPE_CHECKING

from voicefleet.autoscale.policy import (
    Decision,
    FailureGuard,
    Policy,
    Sample,
    decide,
    failing,
    hold_failing,
)

if TYPE_CHECKING:
    from voicefleet.control.service import ControlPlane
    from voicefleet.store.models import AgentRow, DeploymentRow

log = logging.getLogger("voicefleet.autoscale")


class Autoscaler:
    def __init__(
        self, plane: ControlPlane, interval: float = 1.0, guard: FailureGuard | None = None
    ) -> None:
        self.plane = plane
        self.interval = interval
        self.guard = guard or FailureGuard()
        # (agent id, deployment, version) held back as failing, said once until it recovers.
        self._held: set[tuple[str, str, str]] = set()
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
        wished = decide(policy, history, len(rows))
        seen = plane.dispatch.stats.window(agent.name, dep.version, now - self.guard.window)
        why = failing(seen, self.guard)
        decision = hold_failing(policy, wished, len(rows), why, queued)
        self.decisions[key] = (now, decision)
        held = (agent.id, dep.name, dep.version)
        if why is None:
            self._held.discard(held)
        elif decision is not wished and held not in self._held:
            self._held.add(held)
            await plane.repo.event(
                agent.id,
                "autoscale_held",
                f"{dep.name}: {dep.version} not scaled up ({len(rows)} -> {wished.desired} "
                f"wanted: {wished.reason}): {why}",
            )
            log.warning(
                "failing version not scaled up",
                extra={"agent": agent.name, "version": dep.version, "reason": why},
            )
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
