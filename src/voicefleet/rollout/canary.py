"""Canary: a new version takes a growing share of new sessions while it is compared with the
stable one, and is taken out automatically when it does worse.

Steps (each recorded before it is acted on, so a restarted server resumes where it was):
  start      start the canary's instances (enough for its largest share, at least one)
  wait       until they are healthy and their workers registered
  step:N     route steps[N] % of new sessions to the canary, the rest to stable; every second,
             compare the canary with stable over the same window (since the step began):
             instance restarts, failure rate of ended sessions (naming the commonest reasons),
             error log lines per session, median session length, assignment -> running time.
             After `interval` of unpaused time, the next step. A last step below 100 holds until
             `vf agent canary promote`.
  promote    the canary becomes the deployment's version: full size, all new sessions, the old
             instances retire (their sessions finish)
An abort (automatic or `vf agent canary abort`) sends all new sessions back to stable and drains
the canary's instances; its sessions in flight finish. Nobody is hung up on either way.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from voicefleet.dispatch.stats import Window, top
from voicefleet.errors import InvalidRequest, check_numbers
from voicefleet.fleet import NotServing
from voicefleet.rollout.analysis import Analysis, AnalysisCheck, Context, parse_checks
from voicefleet.rollout.model import Command, RolloutState, Run, size

log = logging.getLogger("voicefleet.rollout")


@dataclass(frozen=True)
class Thresholds:
    """When a canary is worse enough than stable to be taken out. Defaults suit voice sessions:
    any crash is a bug; a few more failed calls than stable is not noise."""

    # Canary failure rate minus stable's, over sessions that ended in the window.
    max_failure_rate_increase: float = 0.05
    # Sessions the canary must have ended (or started) before rates are judged.
    min_sessions: int = 5
    # Canary's median assignment -> running time above stable's x ratio + slack seconds.
    max_start_delay_ratio: float = 2.0
    start_delay_slack: float = 1.0
    # Restarts (crashes) of canary instances since the canary began.
    max_restarts: int = 0
    # ERROR lines the canary's instances logged per ended session, minus stable's. An
    # exception in a session's code logs one: half the sessions doing so more than stable's is
    # a broken version, not noise.
    max_error_lines_increase: float = 0.5
    # Canary's median session length (sessions that succeeded) below stable's x ratio - slack
    # seconds: calls that end in 5 s where stable's last minutes are broken even if nothing
    # raised. Judged once both have `min_sessions` such sessions; a ratio of 0 turns it off.
    min_duration_ratio: float = 0.25
    duration_slack: float = 2.0

    def __post_init__(self) -> None:
        check_numbers("canary thresholds", asdict(self), integers=("min_sessions", "max_restarts"))
        if any(v < 0 for v in asdict(self).values()):
            raise InvalidRequest("canary thresholds must be >= 0")
        if self.min_duration_ratio > 1:
            raise InvalidRequest("min_duration_ratio must be <= 1 (a share of stable's length)")


@dataclass(frozen=True)
class CanaryPlan:
    steps: tuple[float, ...] = (10.0, 25.0, 50.0, 100.0)
    interval: float = 300.0
    thresholds: Thresholds = field(default_factory=Thresholds)
    # The user's own checks (a PromQL query, a command), judged beside the built-in ones.
    checks: tuple[AnalysisCheck, ...] = ()
    strategy = "canary"

    def __post_init__(self) -> None:
        if not self.steps:
            raise InvalidRequest("a canary needs at least one step")
        if any(not 0 < s <= 100 for s in self.steps):
            raise InvalidRequest("canary steps are percentages in (0, 100]")
        if list(self.steps) != sorted(self.steps):
            raise InvalidRequest("canary steps must grow")
        if not self.interval >= 0:  # NaN too
            raise InvalidRequest("the canary interval must be >= 0 seconds")

    @property
    def largest_share(self) -> float:
        below = [s for s in self.steps if s < 100]
        return max(below) if below else 100.0

    def instances(self, replicas: int) -> int:
        return max(1, math.ceil(replicas * self.largest_share / 100))

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CanaryPlan:
        try:
            return cls(
                steps=tuple(float(s) for s in data.get("steps", cls.steps)),
                interval=float(data.get("interval", cls.interval)),
                thresholds=Thresholds(**data.get("thresholds") or {}),
                checks=parse_checks(data.get("checks")),
            )
        except (TypeError, ValueError) as e:
            raise InvalidRequest(f"bad canary plan: {e}") from None


Check = Callable[[Window, Window, int, Thresholds], str | None]


def _restarts(canary: Window, stable: Window, restarts: int, t: Thresholds) -> str | None:
    if restarts > t.max_restarts:
        return f"canary instances restarted {restarts} time(s) (crash); allowed {t.max_restarts}"
    return None


def _failures(canary: Window, stable: Window, restarts: int, t: Thresholds) -> str | None:
    if canary.ended < t.min_sessions:
        return None
    if canary.failure_rate - stable.failure_rate <= t.max_failure_rate_increase:
        return None
    reasons = f": {top(canary.failure_reasons)}" if canary.failure_reasons else ""
    return (
        f"canary failed {canary.failed}/{canary.ended} sessions ({canary.failure_rate:.0%})"
        f"{reasons}; stable {stable.failed}/{stable.ended} ({stable.failure_rate:.0%}); "
        f"allowed +{t.max_failure_rate_increase:.0%}"
    )


def _error_lines(canary: Window, stable: Window, restarts: int, t: Thresholds) -> str | None:
    if canary.ended < t.min_sessions:
        return None
    mine, theirs = canary.error_lines_per_session, stable.error_lines_per_session
    if mine - theirs <= t.max_error_lines_increase:
        return None
    kinds = f": {top(canary.error_kinds)}" if canary.error_kinds else ""
    return (
        f"canary logged {canary.error_lines} error line(s) in {canary.ended} sessions "
        f"({mine:.2f} per session){kinds}; stable {stable.error_lines} in {stable.ended} "
        f"({theirs:.2f}); allowed +{t.max_error_lines_increase:g} per session"
    )


def _durations(canary: Window, stable: Window, restarts: int, t: Thresholds) -> str | None:
    mine, theirs = len(canary.durations), len(stable.durations)
    if mine < t.min_sessions or theirs < max(t.min_sessions, 1):
        return None
    limit = stable.duration_p50 * t.min_duration_ratio - t.duration_slack
    if canary.duration_p50 >= limit:
        return None
    return (
        f"canary sessions lasted {canary.duration_p50:.1f}s (median of {mine}) vs stable "
        f"{stable.duration_p50:.1f}s (median of {theirs}); allowed at least {limit:.1f}s"
    )


def _start_delays(canary: Window, stable: Window, restarts: int, t: Thresholds) -> str | None:
    if canary.started < t.min_sessions or not stable.started:
        return None
    limit = stable.start_delay_p50 * t.max_start_delay_ratio + t.start_delay_slack
    if canary.start_delay_p50 <= limit:
        return None
    return (
        f"canary sessions took {canary.start_delay_p50:.2f}s (median) from assignment "
        f"to running vs stable {stable.start_delay_p50:.2f}s; allowed {limit:.2f}s"
    )


# In the order they are asked: a crash says most, then what callers felt, then the slowness.
CHECKS: tuple[Check, ...] = (_restarts, _failures, _error_lines, _durations, _start_delays)


def judge(canary: Window, stable: Window, restarts: int, t: Thresholds) -> str | None:
    """Why the canary must be aborted, or None. Pure: the same windows give the same verdict."""
    for check in CHECKS:
        why = check(canary, stable, restarts, t)
        if why is not None:
            return why
    return None


def may_advance(elapsed: float, interval: float, canary: Window, t: Thresholds) -> bool:
    """A step moves on after its interval, and only once the canary ended enough sessions in it
    to be judged: a canary with too little traffic holds its share, it is never promoted
    unjudged."""
    return elapsed >= interval and canary.ended >= t.min_sessions


async def run_canary(run: Run, plan: CanaryPlan) -> None:
    rollout = run.rollout
    new, stable = rollout.to_version, rollout.from_version
    dep = rollout.deployment
    if rollout.step in ("", "start", "wait"):
        await run.step("start")
        ids = await run.ensure(new, None, plan.instances(size(rollout)))
        await run.step("wait")
        try:
            await run.fleet.wait_serving(ids)
        except NotServing as e:
            await run.give_up(ids)
            await _finish(
                run, RolloutState.ABORTED, f"{new} did not come up: {e}", "canary_aborted"
            )
            return
        await _enter(run, plan, 0)
    ids = await run.ensure(new, None, plan.instances(size(rollout)))
    baseline = run.fleet.restarts(ids)
    async with Analysis(plan.checks) as analysis:
        ctx = run.analysis_context(new, stable) if plan.checks else None
        if await _steps(run, plan, ids, baseline, _Judges(analysis, ctx)):
            return  # aborted: leaving the block stops the checks (and their commands)
    if rollout.step == "promote":
        full = await run.ensure(new, None, size(rollout))
        try:
            await run.fleet.wait_serving(full)
        except NotServing as e:
            await _abort(run, full, f"promotion failed: {e}")
            return
        await run.route(new)
        rollout.weight = 100
        retired = await run.retire_others(full)
        await _finish(
            run, RolloutState.PROMOTED,
            f"{dep} serves {new}; {len(retired)} {stable or 'old'} instance(s) retire",
            "canary_promoted",
        )  # fmt: skip


@dataclass
class _Judges:
    """The user's analysis checks of one canary (none: ctx is None), and the names they take."""

    analysis: Analysis
    ctx: Context | None

    async def failure(self) -> str | None:
        if self.ctx is None:
            return None
        return await self.analysis.failure(self.ctx, asyncio.get_running_loop().time())


async def _steps(
    run: Run, plan: CanaryPlan, ids: list[str], baseline: int, judges: _Judges
) -> bool:
    """Walk the steps below 100 % until the canary is to be promoted (False) or was aborted
    (True)."""
    rollout = run.rollout
    new, stable = rollout.to_version, rollout.from_version
    while rollout.step.startswith("step:"):
        index = int(rollout.step.split(":")[1])
        share = plan.steps[index]
        if share >= 100:
            await run.step("promote")
            break
        if rollout.weight != share:  # resumed after a restart between the two saves
            await _enter(run, plan, index)
        run.set_weights({stable: 100 - share, new: share})
        outcome = await _watch(run, plan, ids, baseline, index, judges)
        if outcome == "abort":
            return True
        if outcome == "promote":
            await run.step("promote")
            break
        await _enter(run, plan, index + 1)
    return False


async def _enter(run: Run, plan: CanaryPlan, index: int) -> None:
    """Record step `index` (its share and start time, in one write), then route by it."""
    rollout = run.rollout
    share = plan.steps[index]
    if share < 100:
        rollout.weight, rollout.step_started_at = share, time.time()
    await run.step(f"step:{index}")
    if share < 100:
        run.set_weights({rollout.from_version: 100 - share, rollout.to_version: share})
        await run.event(
            "canary_step",
            f"{rollout.deployment}: {share:g}% of new sessions to {rollout.to_version}",
        )


async def _watch(
    run: Run, plan: CanaryPlan, ids: list[str], baseline: int, index: int, judges: _Judges
) -> str:
    """Hold one step: 'next' after the interval, 'promote' or 'abort' when told or judged."""
    rollout = run.rollout
    elapsed = time.time() - rollout.step_started_at  # a resumed step keeps its time
    clock = asyncio.get_running_loop().time  # the clock asyncio.sleep counts on
    last = clock()
    holding = index == len(plan.steps) - 1  # the last step below 100 waits for promote
    said_waiting = False
    while True:
        command = run.command()
        if command == Command.ABORT:
            await _abort(run, ids, "aborted by request")
            return "abort"
        if command == Command.PROMOTE:
            return "promote"
        if command == Command.PAUSE and rollout.state != RolloutState.PAUSED:
            rollout.state = RolloutState.PAUSED
            await run.repo.save(rollout)
            await run.event("canary_paused", f"at {rollout.weight:g}%")
        elif command == Command.RESUME and rollout.state == RolloutState.PAUSED:
            rollout.state = RolloutState.PROGRESSING
            await run.repo.save(rollout)
            await run.event("canary_resumed", f"at {rollout.weight:g}%")
        canary, stable = run.windows(
            rollout.to_version, rollout.from_version, rollout.step_started_at
        )
        why = judge(canary, stable, run.fleet.restarts(ids) - baseline, plan.thresholds)
        why = why or await judges.failure()
        if why is not None:
            await _abort(run, ids, why)
            return "abort"
        now = clock()
        paused = rollout.state == RolloutState.PAUSED
        if not paused:
            elapsed += now - last
        last = now
        if not holding and not paused and elapsed >= plan.interval:
            if may_advance(elapsed, plan.interval, canary, plan.thresholds):
                return "next"
            if not said_waiting:
                said_waiting = True
                await run.event(
                    "canary_waiting",
                    f"{rollout.weight:g}% held: canary ended {canary.ended} session(s) this step, "
                    f"{plan.thresholds.min_sessions} needed to judge it",
                )
        await asyncio.sleep(0.5)


async def _abort(run: Run, ids: list[str], why: str) -> None:
    rollout = run.rollout
    stable = rollout.from_version
    run.set_weights({stable: 100})
    rollout.weight = 0
    await run.fleet.drain(ids)
    await _finish(
        run, RolloutState.ABORTED,
        f"canary {rollout.to_version} aborted: {why}; new sessions go to {stable}, "
        f"its {len(ids)} instance(s) drain",
        "canary_aborted",
    )  # fmt: skip
    log.warning("canary aborted", extra={"rollout": rollout.id, "reason": why})


async def _finish(run: Run, state: RolloutState, message: str, kind: str) -> None:
    run.rollout.reason = message
    await run.step("done", state)
    await run.event(kind, message)
