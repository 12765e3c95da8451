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

from dataclasses import dataclass
from typing import Any

from voicefleet.fleet import NotServing
from voicefleet.rollout.model import RolloutState, Run


@dataclass(frozen=True)
class Rolling:
    """A rolling deploy has nothing to set."""

    strategy = "rolling"

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy}


async def run_rolling(run: Run, plan: Rolling) -> None:
    rollout = run.rollout
    deployment, version = rollout.deployment, rollout.to_version
    # A restart replaces instances of the serving version: only ones started since count.
    fresh = rollout.created_at if rollout.reason == "restart" else None
    if rollout.step in ("", "start", "wait"):
        await run.step("start")
        new = await run.ensure(version, fresh, await run.replicas())
        await run.step("wait")
        try:
            await run.fleet.wait_serving(new)
        except NotServing as e:
            await run.give_up(new)
            rollout.reason = str(e)
            await run.step("wait", RolloutState.ABORTED)
            await run.event("rollout_aborted", f"{version} did not come up: {e}")
            return
        await run.step("shift")
    if rollout.step == "shift":
        await run.route(version)
        await run.event("rollout_shifted", f"new sessions of {deployment} go to {version}")
        await run.step("drain")
    if rollout.step == "drain":
        keep = await run.ensure(version, fresh, await run.replicas())
        drained = await run.retire_others(keep)
        await run.step("done", RolloutState.COMPLETE)
        await run.event(
            "rollout_complete",
            f"{deployment} serves {version}; draining {len(drained)} old instance(s)",
        )
