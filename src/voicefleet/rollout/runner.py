"""Runs rollouts: each by its strategy, picked by name from `STRATEGIES` (as uvicorn picks its
protocols), one per deployment at a time, resumed after a restart; takes a canary's commands.

A rollout that breaks off (a bug, a store error) is recorded as aborted and settled: new
sessions go back to the version the deployment records as serving, other instances retire.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from voicefleet.dispatch.service import DispatchService
from voicefleet.errors import InvalidRequest, NotFound
from voicefleet.fleet import Target
from voicefleet.rollout.bluegreen import run_bluegreen
from voicefleet.rollout.canary import run_canary
from voicefleet.rollout.model import RUNNING, Command, Fleet, RolloutState, Run
from voicefleet.rollout.plans import parse_plan
from voicefleet.rollout.rolling import run_rolling
from voicefleet.store.models import SYSTEM, Actor, AgentRow, RolloutRow
from voicefleet.store.repo import Repo

log = logging.getLogger("voicefleet.rollout")

Strategy = Callable[[Run, Any], Awaitable[None]]

STRATEGIES: dict[str, Strategy] = {
    "rolling": run_rolling,
    "canary": run_canary,
    "bluegreen": run_bluegreen,
}


class Rollouts:
    def __init__(self, repo: Repo, dispatch: DispatchService, fleet: Fleet) -> None:
        self.repo = repo
        self.dispatch = dispatch
        self.fleet = fleet
        self._tasks: set[asyncio.Task[None]] = set()
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        # The latest operator command for a running canary (pause, resume, promote, abort).
        self._commands: dict[str, Command] = {}

    def lock(self, agent_id: str, deployment: str) -> asyncio.Lock:
        """Held by a rollout of the deployment (for as long as it runs) and while it is resized
        (autoscaler, `vf agent scale`): one change to a deployment's instances at a time."""
        return self._locks.setdefault((agent_id, deployment), asyncio.Lock())

    def start(self, rollout: RolloutRow) -> None:
        """Run the (recorded) rollout in the background."""
        task = asyncio.create_task(self.run(rollout))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def resume(self) -> None:
        """Go on with the rollouts the last run of the server left unfinished."""
        for rollout in await self.repo.rollouts(states=list(RUNNING), limit=1000):
            log.info("resuming rollout", extra={"rollout": rollout.id, "step": rollout.step})
            self.start(rollout)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def run(self, rollout: RolloutRow) -> None:
        async with self.lock(rollout.agent_id, rollout.deployment):
            try:
                agent = await self.repo.agent(rollout.agent_id)
                if agent is None:
                    raise NotFound(f"no agent '{rollout.agent_id}'")
                run = Run(
                    rollout,
                    Target.of(agent, rollout.deployment),
                    self.fleet,
                    self.repo,
                    self.dispatch,
                    command=lambda: self._commands.get(rollout.id),
                )
                plan = parse_plan(rollout.plan)
                await STRATEGIES.get(rollout.strategy, run_rolling)(run, plan)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.exception("rollout failed", extra={"rollout": rollout.id})
                rollout.state, rollout.reason = RolloutState.ABORTED, f"internal error: {e}"
                await self.repo.save(rollout)
                await self._settle(rollout)
            finally:
                self._commands.pop(rollout.id, None)

    async def _settle(self, rollout: RolloutRow) -> None:
        """After a rollout broke off: new sessions go to the version the deployment records as
        serving, and instances of other versions retire (their sessions finish)."""
        agent = await self.repo.agent(rollout.agent_id)
        dep = await self.repo.deployment(rollout.agent_id, rollout.deployment)
        if agent is None or dep is None or not dep.version:
            return
        self.dispatch.set_weights(agent.name, {dep.version: 100}, dep.name)
        serving = [
            r.id
            for r in await self.fleet.live(agent.id)
            if r.deployment == dep.name and r.version == dep.version
        ]
        target = Target.of(agent, dep.name)
        await self.fleet.retire_others(target, dep.version, serving, warm=True)

    async def command(
        self, agent: AgentRow, deployment: str, command: str, actor: Actor = SYSTEM
    ) -> RolloutRow:
        """pause, resume, promote or abort the canary running on `deployment`; `actor` is who
        asked (the event log's "by")."""
        try:
            told = Command(command)
        except ValueError:
            raise InvalidRequest(
                f"unknown command '{command}' (one of {', '.join(Command)})"
            ) from None
        for rollout in await self.repo.rollouts(agent.id, list(RUNNING)):
            if rollout.deployment == deployment and rollout.strategy == "canary":
                if rollout.step == "promote":  # past the point a command is read
                    raise InvalidRequest(f"canary {rollout.to_version} is already being promoted")
                self._commands[rollout.id] = told
                await self.repo.event(
                    agent.id,
                    f"canary_{told}",
                    f"{told} requested for {rollout.to_version} on {deployment}",
                    actor,
                )
                return rollout
        raise InvalidRequest(f"no canary is running on {deployment}")
