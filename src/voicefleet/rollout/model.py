"""What every rollout strategy shares: its states and commands, the `Fleet` port it drives, and
`Run`, one rollout as a strategy sees it (its row, its target, and the steps it records).

A strategy is `async def run(run: Run, plan) -> None` (see `runner.STRATEGIES`): it walks its
steps, each recorded in the store (`Run.step`) before it is acted on, so a restarted server
resumes where it was. It never reads ids back up: the runner resolves the target once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from voicefleet.dispatch.service import DispatchService
from voicefleet.dispatch.stats import Window
from voicefleet.errors import VoicefleetError
from voicefleet.fleet import Paths, Target
from voicefleet.rollout.analysis import Context
from voicefleet.store.models import InstanceRow, RolloutRow
from voicefleet.store.repo import Repo

log = logging.getLogger("voicefleet.rollout")


class RolloutState(StrEnum):
    PROGRESSING = "progressing"
    PAUSED = "paused"  # a canary held by `vf agent canary pause`
    COMPLETE = "complete"
    PROMOTED = "promoted"  # a canary that became the deployment's version
    ABORTED = "aborted"


RUNNING = (RolloutState.PROGRESSING, RolloutState.PAUSED)  # a rollout not yet ended
SERVED = (RolloutState.COMPLETE, RolloutState.PROMOTED)  # ended with its version serving


class Command(StrEnum):
    """What an operator may tell a running canary."""

    PAUSE = "pause"
    RESUME = "resume"
    PROMOTE = "promote"
    ABORT = "abort"


class RolloutFailed(VoicefleetError):
    pass


class Fleet(Protocol):
    """What a rollout needs of the instances (`voicefleet.fleet.Instances`)."""

    paths: Paths

    async def ensure(
        self, target: Target, version: str, fresh_since: float | None, want: int
    ) -> list[str]: ...
    async def wait_serving(self, instance_ids: list[str]) -> None:
        """Raises `voicefleet.fleet.NotServing` when they do not come up."""
        ...

    async def retire_others(
        self, target: Target, serving: str, keep: list[str], warm: bool
    ) -> list[str]: ...
    async def give_up(
        self, target: Target, serving: str, instance_ids: list[str], since: float
    ) -> None: ...
    async def drain(self, instance_ids: list[str]) -> None: ...
    async def live(self, agent_id: str) -> list[InstanceRow]: ...
    def restarts(self, instance_ids: list[str]) -> int: ...
    def poll_logs(self) -> None: ...
    def http_url(self) -> str: ...


def size(rollout: RolloutRow) -> int:
    """The deployment's size when the rollout began, at least one (recorded in its plan)."""
    return max(1, int(rollout.plan.get("replicas", 1)))


@dataclass
class Run:
    """One rollout in progress: its row, where it acts and what it acts through."""

    rollout: RolloutRow
    target: Target
    fleet: Fleet
    repo: Repo
    dispatch: DispatchService
    # The latest operator command for this rollout, if any (a canary's pause, abort...).
    command: Callable[[], str | None] = lambda: None

    async def step(self, step: str, state: RolloutState = RolloutState.PROGRESSING) -> None:
        """Record the step (and state) the rollout is at, before acting on it."""
        rollout = self.rollout
        rollout.step, rollout.state, rollout.updated_at = step, state, time.time()
        await self.repo.save(rollout)
        log.info(
            "rollout step",
            extra={"rollout": rollout.id, "to": rollout.to_version, "step": step, "state": state},
        )

    async def event(self, kind: str, message: str) -> None:
        await self.repo.event(self.target.agent_id, kind, message)

    async def replicas(self) -> int:
        """The deployment's size now."""
        dep = await self.repo.deployment(self.target.agent_id, self.target.deployment)
        return dep.replicas if dep is not None else 1

    async def serving(self) -> str:
        """The version the deployment records as serving."""
        dep = await self.repo.deployment(self.target.agent_id, self.target.deployment)
        return dep.version if dep is not None else ""

    async def ensure(self, version: str, fresh_since: float | None, want: int) -> list[str]:
        return await self.fleet.ensure(self.target, version, fresh_since, want)

    async def route(self, version: str) -> None:
        """The deployment serves `version` from now on: recorded, then all new sessions."""
        t = self.target
        dep = await self.repo.deployment(t.agent_id, t.deployment)
        if dep is not None:
            dep.version, dep.updated_at = version, time.time()
            await self.repo.save(dep)
        self.dispatch.set_weights(t.agent_name, {version: 100}, t.deployment)

    def set_weights(self, weights: dict[str, float]) -> None:
        self.dispatch.set_weights(self.target.agent_name, weights, self.target.deployment)

    async def retire_others(self, keep: list[str], warm: bool = True) -> list[str]:
        """Instances other than `keep` stop taking sessions: other versions' retire (kept warm
        for a rollback) or, with `warm=False`, drain now."""
        return await self.fleet.retire_others(self.target, await self.serving(), keep, warm)

    async def give_up(self, instance_ids: list[str]) -> None:
        """Let go of what this rollout gathered; nobody's session is cut."""
        serving = await self.serving()
        await self.fleet.give_up(self.target, serving, instance_ids, self.rollout.created_at)

    def windows(self, a: str, b: str, since: float) -> tuple[Window, Window]:
        name = self.target.agent_name
        return self.dispatch.window(name, a, since), self.dispatch.window(name, b, since)

    def analysis_context(self, version: str, stable: str) -> Context:
        """The names a canary's analysis checks take; commands run in the version's folder."""
        return Context(
            agent=self.target.agent_name,
            deployment=self.target.deployment,
            version=version,
            stable_version=stable,
            workdir=str(self.fleet.paths.source(self.target.agent_id, version)),
        )
