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

from dataclasses import asdict, dataclass, field
from typing import Any

from voicefleet.errors import InvalidRequest
from voicefleet.fleet import NotServing
from voicefleet.rollout.model import RolloutState, Run, size
from voicefleet.rollout.smoke import SmokeTest, smoke_test


@dataclass(frozen=True)
class BlueGreen:
    """Green beside blue with no traffic, smoke-tested, then switched all at once."""

    smoke: SmokeTest = field(default_factory=SmokeTest)
    strategy = "bluegreen"

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "smoke": asdict(self.smoke)}

    @classmethod
    def from_dict(cls, plan: dict[str, Any]) -> BlueGreen:
        smoke = plan.get("smoke") or {}
        if not isinstance(smoke, dict):
            raise InvalidRequest("bad smoke test settings: smoke must be an object")
        try:
            return cls(SmokeTest(**smoke))
        except TypeError as e:
            raise InvalidRequest(f"bad smoke test settings: {e}") from None


async def run_bluegreen(run: Run, plan: BlueGreen) -> None:
    rollout, test = run.rollout, plan.smoke
    dep, green = rollout.deployment, rollout.to_version
    if rollout.step in ("", "start", "wait", "smoke"):
        await run.step("start")
        ids = await run.ensure(green, None, size(rollout))
        await run.step("wait")
        try:
            await run.fleet.wait_serving(ids)
        except NotServing as e:
            await run.give_up(ids)
            await _abort(run, f"green {green} did not come up: {e}")
            return
        await run.step("smoke")
        failure = await smoke_test(run, green, ids, test)
        if failure is not None:
            await run.give_up(ids)
            await _abort(run, f"smoke test of {green} failed: {failure}")
            return
        await run.event("smoke_passed", f"{green}: {test.sessions} synthetic session(s) ok")
        await run.step("shift")
    if rollout.step == "shift":
        await run.route(green)
        await run.event("bluegreen_switched", f"all new sessions of {dep} go to {green}")
        await run.step("drain")
    if rollout.step == "drain":
        keep = await run.ensure(green, None, size(rollout))
        blue = await run.retire_others(keep, warm=False)
        rollout.reason = f"{dep} serves {green}; blue's {len(blue)} instance(s) drain"
        await run.step("done", RolloutState.COMPLETE)
        await run.event("rollout_complete", rollout.reason)


async def _abort(run: Run, why: str) -> None:
    rollout = run.rollout
    rollout.reason = why + f"; {rollout.from_version or 'nothing'} keeps serving"
    await run.step("smoke", RolloutState.ABORTED)
    await run.event("rollout_aborted", rollout.reason)
