"""Rolling deploy (and rollback, which is a rolling deploy to an older version).

Steps, each recorded in the store before it is acted on so a restarted server resumes:
  start  start the new version's instances (as many as the deployment's replicas)
  wait   until each is healthy and its worker registered with the dispatcher
  shift  route new sessions to the new version (sessions in flight stay where they are)
  drain  old instances stop taking jobs, finish their sessions, then exit (SIGKILL only after
         the agent's grace period)
A failure before `shift` stops the new instances and leaves the old version serving.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from voicefleet.errors import VoicefleetError
from voicefleet.store.models import RolloutRow
from voicefleet.store.repo import Repo

log = logging.getLogger("voicefleet.rollout")

PROGRESSING, COMPLETE, ABORTED = "progressing", "complete", "aborted"


class RolloutFailed(VoicefleetError):
    pass


class Fleet(Protocol):
    """What a rollout needs of the control plane."""

    async def ensure_instances(
        self,
        agent_id: str,
        deployment: str,
        version: str,
        fresh_since: float | None,
        count: int | None = None,
    ) -> list[str]: ...
    async def wait_serving(self, instance_ids: list[str]) -> None: ...
    async def route(self, agent_id: str, deployment: str, version: str) -> None: ...
    async def drain_others(
        self, agent_id: str, deployment: str, keep: list[str], warm: bool = True
    ) -> list[str]: ...
    async def give_up(self, rollout: RolloutRow, instance_ids: list[str]) -> None: ...


def size(rollout: RolloutRow) -> int:
    """The deployment's size when the rollout began, at least one (recorded in its plan)."""
    return max(1, int(rollout.plan.get("replicas", 1)))


async def _step(repo: Repo, rollout: RolloutRow, step: str, state: str = PROGRESSING) -> None:
    rollout.step, rollout.state, rollout.updated_at = step, state, time.time()
    await repo.save(rollout)
    log.info(
        "rollout step",
        extra={"rollout": rollout.id, "to": rollout.to_version, "step": step, "state": state},
    )


async def run_rolling(rollout: RolloutRow, fleet: Fleet, repo: Repo) -> None:
    agent, deployment, version = rollout.agent_id, rollout.deployment, rollout.to_version
    # A restart replaces instances of the serving version: only ones started since count.
    fresh = rollout.created_at if rollout.reason == "restart" else None
    if rollout.step in ("", "start", "wait"):
        await _step(repo, rollout, "start")
        new = await fleet.ensure_instances(agent, deployment, version, fresh)
        await _step(repo, rollout, "wait")
        try:
            await fleet.wait_serving(new)
        except RolloutFailed as e:
            await fleet.give_up(rollout, new)
            rollout.reason = str(e)
            await _step(repo, rollout, "wait", ABORTED)
            await repo.event(agent, "rollout_aborted", f"{version} did not come up: {e}")
            return
        await _step(repo, rollout, "shift")
    if rollout.step == "shift":
        await fleet.route(agent, deployment, version)
        await repo.event(agent, "rollout_shifted", f"new sessions of {deployment} go to {version}")
        await _step(repo, rollout, "drain")
    if rollout.step == "drain":
        keep = await fleet.ensure_instances(agent, deployment, version, fresh)
        drained = await fleet.drain_others(agent, deployment, keep)
        await _step(repo, rollout, "done", COMPLETE)
        await repo.event(
            agent,
            "rollout_complete",
            f"{deployment} serves {version}; draining {len(drained)} old instance(s)",
        )
