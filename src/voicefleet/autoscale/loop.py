"""The one loop that applies autoscaling decisions.

Every second (and at once when a session is queued for an agent, so a scaled-to-zero agent starts
its first instance without waiting for the tick) it samples each autoscaled deployment's
instances as the dispatcher sees them (the load and sessions their workers report, plus the
agent's queued jobs), asks `policy.decide`, and resizes through its `Pools`: new instances
start at once; going down, idle instances drain first and busy ones are only ever drained.
A deployment in the middle of a rollout is left alone until the rollout ends. A version whose
recent sessions mostly fail (the dispatcher's per-version stats) is not scaled up: an
`autoscale_held` event says so once, until it stops failing.

For the dashboard it keeps, per deployment and in memory only, a bounded history: what each
tick saw (instances, sessions, load, queued jobs, the size it decided) and each decision that
changed the size or said something new about why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from voicefleet.autoscale.policy import (
    Decision,
    FailureGuard,
    InstanceSignal,
    Policy,
    Sample,
    decide,
    failing,
    hold_failing,
)
from voicefleet.dispatch.registry import PoolKey
from voicefleet.dispatch.service import DispatchService
from voicefleet.store.models import AgentRow, DeploymentRow
from voicefleet.store.repo import Repo

log = logging.getLogger("voicefleet.autoscale")

POINTS = 3600  # ticks kept per deployment: an hour at one a second
DECISIONS = 200  # decisions kept per deployment


@dataclass(frozen=True)
class Point:
    """What one tick saw of a deployment, and the size it decided on."""

    at: float
    instances: int
    desired: int
    sessions: int
    queued: int
    load: float  # the sum of its registered instances' loads


@dataclass(frozen=True)
class Logged:
    """A decision worth a line: it changed the size, was held back, or gave a new reason."""

    at: float
    instances: int
    desired: int
    reason: str
    held: str = ""  # why a wished scale-up was not made (a failing version)


def instance_signals(dispatch: DispatchService, instance_ids: list[str]) -> list[InstanceSignal]:
    """What the dispatcher sees of each instance now: its worker's load and sessions."""
    seen = dispatch.instances()
    out = []
    for instance_id in instance_ids:
        view = seen.get(instance_id)
        out.append(
            InstanceSignal(instance_id, view.load, view.sessions, True)
            if view is not None and view.connected
            else InstanceSignal(instance_id, registered=False)
        )
    return out


class Pools(Protocol):
    """What the autoscaler needs of whoever sizes deployments (`voicefleet.control.sizing`)."""

    def lock(self, agent_id: str, deployment: str) -> asyncio.Lock:
        """Held while anything else changes the deployment's instances (a rollout)."""
        ...

    async def serving_instances(self, agent: AgentRow, dep: DeploymentRow) -> list[str]:
        """Ids of the live instances of the deployment's serving version."""
        ...

    async def resize(self, agent: AgentRow, dep: DeploymentRow, n: int) -> list[str]:
        """Run `n` instances (idle ones drain first); the instances started or drained."""
        ...


class Autoscaler:
    def __init__(
        self,
        dispatch: DispatchService,
        repo: Repo,
        pools: Pools,
        interval: float = 1.0,
        guard: FailureGuard | None = None,
    ) -> None:
        self.dispatch = dispatch
        self.repo = repo
        self.pools = pools
        self.interval = interval
        self.guard = guard or FailureGuard()
        # (agent id, deployment, version) held back as failing, said once until it recovers.
        self._held: set[tuple[str, str, str]] = set()
        self.samples: dict[tuple[str, str], deque[Sample]] = {}
        self.decisions: dict[tuple[str, str], tuple[float, Decision]] = {}
        self.points: dict[tuple[str, str], deque[Point]] = {}
        self.logged: dict[tuple[str, str], deque[Logged]] = {}
        # (agent id, deployment) -> (agent name, it may start another instance now: below its
        # maximum, not held as failing). A LiveKit server in front is told such an agent is
        # not full (see can_start).
        self._headroom: dict[tuple[str, str], tuple[str, bool]] = {}
        self._wake = asyncio.Event()
        dispatch.on_queued(lambda _agent_name: self._wake.set())

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
        queued = self.dispatch.queued_by_agent()
        now = time.time()
        for dep in await self.repo.deployments():
            if dep.autoscale is None or not dep.version:
                self._headroom.pop((dep.agent_id, dep.name), None)
                continue
            agent = await self.repo.agent(dep.agent_id)
            lock = self.pools.lock(dep.agent_id, dep.name)
            if agent is None or lock.locked():
                continue  # a rollout is under way: its sizes are its own
            async with lock:
                # Read again: a rollout may have ended (and changed the version) since the list.
                fresh = await self.repo.deployment(agent.id, dep.name)
                if fresh is not None and fresh.autoscale is not None and fresh.version:
                    await self._scale(agent, fresh, queued.get(agent.name, 0), now)

    async def _scale(self, agent: AgentRow, dep: DeploymentRow, queued: int, now: float) -> None:
        assert dep.autoscale is not None
        policy = Policy.from_dict(dep.autoscale)
        rows = await self.pools.serving_instances(agent, dep)
        key = (agent.id, dep.name)
        history = self.samples.setdefault(key, deque())
        history.append(Sample(now, tuple(instance_signals(self.dispatch, rows)), queued))
        keep = max(policy.up_window, policy.down_window, policy.idle_to_zero or 0) + 5
        while history and history[0].at < now - keep:
            history.popleft()
        wished = decide(policy, history, len(rows))
        seen = self.dispatch.window(agent.name, dep.version, now - self.guard.window)
        why = failing(seen, self.guard)
        decision = hold_failing(policy, wished, len(rows), why, queued)
        self.decisions[key] = (now, decision)
        held_why = why if why is not None and decision is not wished else ""
        self._remember(key, history[-1], len(rows), decision, held_why)
        self._headroom[key] = (agent.name, why is None and len(rows) < policy.max_instances)
        held = (agent.id, dep.name, dep.version)
        if why is None:
            self._held.discard(held)
        elif decision is not wished and held not in self._held:
            self._held.add(held)
            await self.repo.event(
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
        changed = await self.pools.resize(agent, dep, decision.desired)
        verb = "up" if decision.desired > len(rows) else "down"
        await self.repo.event(
            agent.id,
            f"autoscaled_{verb}",
            f"{dep.name}: {len(rows)} -> {decision.desired} instance(s): {decision.reason}"
            + (f" ({', '.join(changed)})" if changed else ""),
        )
        log.info(
            "autoscaled", extra={"agent": agent.name, "from": len(rows), "to": decision.desired}
        )

    def _remember(
        self, key: tuple[str, str], sample: Sample, current: int, decision: Decision, held: str
    ) -> None:
        points = self.points.setdefault(key, deque(maxlen=POINTS))
        points.append(
            Point(sample.at, current, decision.desired, sample.sessions, sample.queued, sample.load)
        )
        logged = self.logged.setdefault(key, deque(maxlen=DECISIONS))
        last = logged[-1] if logged else None
        if (
            decision.desired != current
            or last is None
            or (last.reason, last.held) != (decision.reason, held)
        ):
            logged.append(Logged(sample.at, current, decision.desired, decision.reason, held))

    def history(self, agent_id: str, deployment: str) -> tuple[list[Point], list[Logged]]:
        """The deployment's recent ticks, oldest first, and its decisions, newest first."""
        key = (agent_id, deployment)
        return list(self.points.get(key, ())), list(reversed(self.logged.get(key, ())))

    def can_start(self, key: PoolKey) -> bool:
        """Whether an instance of the agent of pool `key` can be started now, in any of its
        autoscaled deployments (scale from zero included)."""
        return any(ok for name, ok in self._headroom.values() if name == key.agent_name)

    def last(self, agent_id: str, deployment: str) -> tuple[Point, Decision] | None:
        """What the deployment's latest tick saw and decided, if it had one."""
        key = (agent_id, deployment)
        points, found = self.points.get(key), self.decisions.get(key)
        if not points or found is None:
            return None
        return points[-1], found[1]

    def decision(self, agent_id: str, deployment: str) -> dict[str, object] | None:
        found = self.decisions.get((agent_id, deployment))
        if found is None:
            return None
        at, d = found
        return {"at": at, "desired": d.desired, "wanted": d.wanted, "reason": d.reason}
