"""How many instances a deployment wants: a pure function of its policy and recent signals.

Made for voice sessions, which last minutes and cannot move between workers:
- scale on the load workers report themselves (their own `load_fnc`), aiming at `scale_up_load`,
  below the load at which they turn FULL (`load_threshold`), so new capacity is up before the
  running workers refuse offers;
- queued sessions mean no worker would take them: ask for more at once, without a window;
- going up, a short stabilization window (the smallest wish over it); going down, a long one (the
  largest), so a lull between calls does not start a drain;
- scale to zero after a deployment has had no session for `idle_to_zero` seconds, and warm spares
  on top of what load asks for.

Which instances go on a scale-down is `pick_victims`: idle ones first; an instance with sessions is
only ever drained (its sessions finish), never stopped.

A version whose recent sessions mostly fail is not scaled up (`failing`, `hold_failing`): more
instances of it would only fail more calls. It keeps what it has (and its minimum).

Everything here is deterministic: the same (policy, samples) give the same decision, so decisions
are unit-tested and replayed by the simulator in benchmarks/autoscale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

from voicefleet.dispatch.stats import Window, top
from voicefleet.errors import check_numbers


@dataclass(frozen=True)
class Policy:
    min_instances: int = 1
    max_instances: int = 10
    scale_up_load: float = 0.5
    load_threshold: float = 0.75
    up_window: float = 15.0
    down_window: float = 300.0
    sessions_per_instance: int | None = None
    idle_to_zero: float | None = None
    warm: int = 0

    def __post_init__(self) -> None:
        check_numbers(
            "autoscaling policy",
            asdict(self),
            integers=("min_instances", "max_instances", "sessions_per_instance", "warm"),
        )
        problems = []
        if not 0 <= self.min_instances <= self.max_instances:
            problems.append("need 0 <= min_instances <= max_instances")
        if not 0 < self.scale_up_load <= self.load_threshold <= 1:
            problems.append("need 0 < scale_up_load <= load_threshold <= 1")
        if self.up_window < 0 or self.down_window < 0:
            problems.append("stabilization windows must be >= 0 seconds")
        if self.sessions_per_instance is not None and self.sessions_per_instance < 1:
            problems.append("sessions_per_instance must be >= 1")
        if self.idle_to_zero is not None and self.idle_to_zero < 0:
            problems.append("idle_to_zero must be >= 0 seconds")
        if self.idle_to_zero is not None and self.min_instances > 0:
            problems.append("scale to zero (idle_to_zero) needs min_instances = 0")
        if self.warm < 0:
            problems.append("warm must be >= 0")
        if problems:
            raise ValueError("; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Policy:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown policy fields: {', '.join(sorted(unknown))}")
        return cls(**data)


@dataclass(frozen=True)
class InstanceSignal:
    """What the dispatcher knows of one instance's worker at one moment."""

    id: str
    load: float = 0.0
    sessions: int = 0
    registered: bool = True  # False while starting: capacity on its way, reporting nothing yet


@dataclass(frozen=True)
class Sample:
    at: float
    instances: tuple[InstanceSignal, ...] = ()
    queued: int = 0

    # Cached: `decide` asks every sample of the down window again each second.
    @cached_property
    def sessions(self) -> int:
        return sum(i.sessions for i in self.instances)

    @cached_property
    def load(self) -> float:
        return sum(i.load for i in self.instances if i.registered)


# What a decision did, in a word: a small fixed set, fit for a metric label (`reason` is text).
KINDS = (
    "no_signals", "cold_start", "idle_to_zero", "scale_up", "scale_down", "holding", "steady",
    "held_failing",
)  # fmt: skip


@dataclass(frozen=True)
class Decision:
    desired: int
    reason: str
    wanted: int = 0  # what the latest sample alone asks for, before windows and bounds
    details: dict[str, Any] = field(default_factory=dict)
    kind: str = field(default="steady", compare=False)  # one of KINDS


def wanted(policy: Policy, sample: Sample) -> tuple[int, str]:
    """What one sample alone asks for (before windows, warm spares and bounds), and why."""
    current = len(sample.instances)
    by_load = math.ceil(round(sample.load / policy.scale_up_load, 6))
    reason = f"load {sample.load:.2f} / target {policy.scale_up_load:g} per instance"
    n = by_load
    if policy.sessions_per_instance:
        by_sessions = math.ceil((sample.sessions + sample.queued) / policy.sessions_per_instance)
        if by_sessions > n:
            n = by_sessions
            reason = (
                f"{sample.sessions + sample.queued} sessions (incl. queued) / "
                f"{policy.sessions_per_instance} per instance"
            )
    if sample.queued:
        # No worker would take these: more capacity now, beyond what instances still starting
        # will bring. Guess what an instance holds from what the busiest ones hold at their
        # threshold; one instance per queued session at worst.
        per_instance = policy.sessions_per_instance or _observed_capacity(policy, sample)
        # Counting from the registered instances (not `current`) leaves the starting ones out
        # of the wish when they cover the queue, so warm spares are not added again each tick.
        registered = sum(1 for i in sample.instances if i.registered)
        by_queue = registered + math.ceil(sample.queued / per_instance)
        if by_queue > n:
            n = by_queue
            reason = f"{sample.queued} session(s) queued with {current} instance(s)"
    return n, reason


def _observed_capacity(policy: Policy, sample: Sample) -> int:
    best = 1
    for i in sample.instances:
        if i.registered and i.load > 0 and i.sessions:
            best = max(best, math.floor(i.sessions * policy.load_threshold / i.load))
    return best


def decide(policy: Policy, samples: Sequence[Sample], current: int) -> Decision:
    """The instance count to run now, given samples in time order (the last one is now)."""
    if not samples:
        return Decision(max(current, policy.min_instances), "no signals yet", kind="no_signals")
    now = samples[-1].at
    n, reason = wanted(policy, samples[-1])
    asked = n  # what the latest sample alone wants (Decision.wanted), whatever windows make of it
    if samples[-1].queued and current == 0:
        return _bounded(
            policy, max(1, asked) + policy.warm, "cold start: a session waits", asked, "cold_start"
        )
    if policy.idle_to_zero is not None:
        idle_since = _idle_since(samples)
        if idle_since is not None and now - idle_since >= policy.idle_to_zero:
            return Decision(
                0, f"no session for {now - idle_since:.0f}s (scale to zero after "
                f"{policy.idle_to_zero:g}s)", asked, kind="idle_to_zero",
            )  # fmt: skip
    if n + policy.warm > current:
        # Up: the smallest wish over the short window, so a blip does not start instances;
        # queued sessions skip the window.
        if not samples[-1].queued:
            recent = [wanted(policy, s)[0] for s in samples if s.at >= now - policy.up_window]
            covered = samples[0].at <= now - policy.up_window
            n = min(recent) if covered else current - policy.warm
            if n + policy.warm <= current:
                return _bounded(
                    policy, current, f"holding: up wanted for < {policy.up_window:g}s", asked,
                    "holding",
                )  # fmt: skip
        return _bounded(policy, n + policy.warm, reason, asked, "scale_up")
    if n + policy.warm < current and samples[-1].queued:
        return _bounded(
            policy, current, f"holding: {reason}, instances still starting", asked, "holding"
        )
    if n + policy.warm < current:
        # Down: the largest wish over the long window.
        recent = [wanted(policy, s)[0] for s in samples if s.at >= now - policy.down_window]
        covered = samples[0].at <= now - policy.down_window
        top = max(recent) if covered else current - policy.warm
        if policy.idle_to_zero is not None:
            top = max(top, 1)  # to zero only through idle_to_zero, after that much idle time
        if top + policy.warm >= current:
            return _bounded(
                policy, current, f"holding: down wanted for < {policy.down_window:g}s", asked,
                "holding",
            )  # fmt: skip
        return _bounded(policy, top + policy.warm, f"load fell: {reason}", asked, "scale_down")
    return _bounded(policy, current, f"steady: {reason}", asked)


def _idle_since(samples: Sequence[Sample]) -> float | None:
    """Since when no sample shows a session or a queued job; None if the latest one does."""
    since = None
    for s in reversed(samples):
        if s.sessions or s.queued:
            break
        since = s.at
    return since


def _bounded(
    policy: Policy, n: int, reason: str, wanted_now: int, kind: str = "steady"
) -> Decision:
    if n > policy.max_instances:
        return Decision(
            policy.max_instances,
            f"{reason}; capped at max {policy.max_instances}",
            wanted_now,
            kind=kind,
        )
    if n < policy.min_instances:
        return Decision(
            policy.min_instances,
            f"{reason}; kept at min {policy.min_instances}",
            wanted_now,
            kind=kind,
        )
    return Decision(n, reason, wanted_now, kind=kind)


def pick_victims(instances: Sequence[InstanceSignal], count: int) -> list[InstanceSignal]:
    """The `count` instances to let go on a scale-down: idle first, then the least busy.

    Starting instances (not registered yet) hold no session and count as idle. The caller
    drains what this returns; a drained instance finishes its sessions before it exits.
    """
    order = sorted(instances, key=lambda i: (i.sessions, i.load, i.registered))
    return list(order[: max(0, count)])


@dataclass(frozen=True)
class FailureGuard:
    """When a version's recent sessions count as mostly failing."""

    max_failure_rate: float = 0.5
    min_sessions: int = 5  # ended in the window: fewer say nothing
    window: float = 300.0  # seconds of recent sessions


def failing(seen: Window, guard: FailureGuard) -> str | None:
    """Why the version's recent sessions (`seen`, over `guard.window`) count as failing, or
    None."""
    if seen.ended < guard.min_sessions or seen.failure_rate < guard.max_failure_rate:
        return None
    reasons = f": {top(seen.failure_reasons)}" if seen.failure_reasons else ""
    return f"{seen.failed}/{seen.ended} recent sessions failed ({seen.failure_rate:.0%}){reasons}"


def hold_failing(
    policy: Policy, decision: Decision, current: int, why: str | None, queued: int = 0
) -> Decision:
    """`decision`, but never above what a failing version runs now (`why` says it fails): no
    more instances to fail more calls. Its minimum still holds, and with nothing running a
    queued session still gets one instance rather than waiting for nothing."""
    if why is None or decision.desired <= current:
        return decision
    ceiling = max(current, policy.min_instances, 1 if queued and current == 0 else 0)
    if decision.desired <= ceiling:
        return decision
    return Decision(
        ceiling,
        f"holding at {ceiling}, not scaling up to {decision.desired}: {why}",
        decision.wanted,
        decision.details,
        kind="held_failing",
    )
