"""Blue-green: the new version (green) starts beside the serving one (blue) with no traffic, is
smoke-tested with synthetic sessions of its own, then takes every new session at once while blue
drains its sessions in flight.

Steps (recorded before they are acted on):
  start   start green at the deployment's full size; routing is untouched (weight 0)
  wait    until green's instances are healthy and registered
  smoke   `sessions` synthetic sessions dispatched to green only; they must run and succeed with
          no green instance restarting and log no more than `max_error_lines` ERROR lines (as a
          canary's sessions are judged: `smoke_verdict`); then the user's smoke command, if
          any, must exit 0
  shift   all new sessions to green
  drain   blue's instances drain now: `vf agent status` shows their sessions counting down;
          each exits when its last session ends, or is stopped at the end of the grace period
A failed smoke test stops green and leaves blue serving as if nothing happened.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol

from voicefleet.dispatch.stats import Window, top
from voicefleet.errors import InvalidRequest, check_numbers
from voicefleet.rollout.rolling import ABORTED, COMPLETE, Fleet, RolloutFailed, _step, size
from voicefleet.store.models import RolloutRow
from voicefleet.store.repo import Repo


@dataclass(frozen=True)
class SmokeTest:
    sessions: int = 3
    timeout: float = 60.0
    metadata: str = '{"smoke": true}'
    command: str = ""  # run in the version's source folder; exit 0 passes
    # ERROR lines the synthetic sessions may log in all: an exception in a session's code logs
    # one even when the worker reports the session succeeded.
    max_error_lines: int = 0

    def __post_init__(self) -> None:
        numbers: dict[str, object] = {
            "sessions": self.sessions,
            "timeout": self.timeout,
            "max_error_lines": self.max_error_lines,
        }
        check_numbers("smoke test", numbers, ("sessions", "max_error_lines"))
        if not isinstance(self.metadata, str) or not isinstance(self.command, str):
            raise InvalidRequest("smoke test: metadata and command must be strings")
        if not 0 <= self.sessions <= 100:
            raise InvalidRequest("smoke sessions must be between 0 and 100")
        if self.timeout <= 0:
            raise InvalidRequest("the smoke timeout must be > 0 seconds")
        if self.max_error_lines < 0:
            raise InvalidRequest("smoke max_error_lines must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": "bluegreen", "smoke": asdict(self)}

    @classmethod
    def from_plan(cls, plan: dict[str, Any]) -> SmokeTest:
        try:
            return cls(**plan.get("smoke", {}))
        except TypeError as e:
            raise InvalidRequest(f"bad smoke test settings: {e}") from None


def smoke_verdict(test: SmokeTest, version: str, seen: Window, restarts: int) -> str | None:
    """Why the synthetic sessions fail the smoke test, or None. Pure. `seen` is what the smoke
    sessions did (and nothing else); they are judged as a canary's are, but with no stable to
    compare with, every one must succeed."""
    if restarts:
        return f"a {version} instance crashed during the smoke test"
    n = test.sessions
    if seen.failed:
        return f"{seen.failed}/{n} synthetic session(s) failed: {top(seen.failure_reasons)}"
    if seen.succeeded < n:
        late = n - seen.succeeded
        return f"{late}/{n} synthetic session(s) did not succeed within {test.timeout:g}s"
    if seen.error_lines > test.max_error_lines:
        return (
            f"synthetic sessions logged {seen.error_lines} error line(s): "
            f"{top(seen.error_kinds)}; allowed {test.max_error_lines}"
        )
    return None


class BlueGreenFleet(Fleet, Protocol):
    async def smoke_test(
        self, agent_id: str, deployment: str, version: str, instance_ids: list[str], test: SmokeTest
    ) -> str | None: ...


async def run_bluegreen(rollout: RolloutRow, fleet: BlueGreenFleet, repo: Repo) -> None:
    agent, dep, green = rollout.agent_id, rollout.deployment, rollout.to_version
    test = SmokeTest.from_plan(rollout.plan)
    if rollout.step in ("", "start", "wait", "smoke"):
        await _step(repo, rollout, "start")
        ids = await fleet.ensure_instances(agent, dep, green, None, size(rollout))
        await _step(repo, rollout, "wait")
        try:
            await fleet.wait_serving(ids)
        except RolloutFailed as e:
            await fleet.give_up(rollout, ids)
            await _abort(repo, rollout, f"green {green} did not come up: {e}")
            return
        await _step(repo, rollout, "smoke")
        failure = await fleet.smoke_test(agent, dep, green, ids, test)
        if failure is not None:
            await fleet.give_up(rollout, ids)
            await _abort(repo, rollout, f"smoke test of {green} failed: {failure}")
            return
        await repo.event(agent, "smoke_passed", f"{green}: {test.sessions} synthetic session(s) ok")
        await _step(repo, rollout, "shift")
    if rollout.step == "shift":
        await fleet.route(agent, dep, green)
        await repo.event(agent, "bluegreen_switched", f"all new sessions of {dep} go to {green}")
        await _step(repo, rollout, "drain")
    if rollout.step == "drain":
        keep = await fleet.ensure_instances(agent, dep, green, None, size(rollout))
        blue = await fleet.drain_others(agent, dep, keep, warm=False)
        rollout.reason = f"{dep} serves {green}; blue's {len(blue)} instance(s) drain"
        await _step(repo, rollout, "done", COMPLETE)
        await repo.event(agent, "rollout_complete", rollout.reason)


async def _abort(repo: Repo, rollout: RolloutRow, why: str) -> None:
    rollout.reason = why + f"; {rollout.from_version or 'nothing'} keeps serving"
    await _step(repo, rollout, "smoke", ABORTED)
    await repo.event(rollout.agent_id, "rollout_aborted", rollout.reason)
