"""The autoscaling policy as a pure function: samples in, an instance count out.

The helpers replay a second-by-second history the way `autoscale/loop.py` does (append a
sample, decide, resize); here a resize takes effect at once and every instance is registered,
unless a test says otherwise.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict

import pytest

from voicefleet.autoscale.policy import (
    KINDS,
    Decision,
    FailureGuard,
    InstanceSignal,
    Policy,
    Sample,
    decide,
    failing,
    hold_failing,
    pick_victims,
)
from voicefleet.dispatch.stats import Window
from voicefleet.errors import InvalidRequest

CAPACITY = 8  # sessions at load 1.0, as the simulator's workers


def sample(at: float, loads: list[float], queued: int = 0) -> Sample:
    """Registered instances with these loads, each holding load x CAPACITY sessions."""
    return Sample(
        at,
        tuple(
            InstanceSignal(f"i{k}", load, round(load * CAPACITY)) for k, load in enumerate(loads)
        ),
        queued,
    )


def spread(at: float, n: int, total_load: float, queued: int = 0) -> Sample:
    return sample(at, [total_load / n] * n if n else [], queued)


def replay(
    policy: Policy, current: int, total_load_at, seconds: range
) -> list[tuple[int, int, str]]:
    """Every resize of a replay as (second, new size, reason); the load is spread evenly."""
    history: list[Sample] = []
    resizes = []
    for t in seconds:
        history.append(spread(t, current, total_load_at(t)))
        d = decide(policy, history, current)
        if d.desired != current:
            resizes.append((t, d.desired, d.reason))
            current = d.desired
    return resizes


def test_rising_load_scales_up_once_the_up_window_is_covered_and_before_a_worker_is_full():
    policy = Policy(max_instances=10)  # scale_up_load 0.5, load_threshold 0.75, up_window 15
    history: list[Sample] = []
    first_up = None
    for t in range(40):
        per_instance = round(0.40 + 0.01 * t, 2)  # 2 instances ramping 0.01 load per second
        history.append(sample(t, [per_instance, per_instance]))
        d = decide(policy, history, 2)
        if d.desired > 2:
            first_up = (t, per_instance, d.desired)
            break
    # The wish for a 3rd instance starts at t=11 (2 x 0.51 > 2 x 0.5) and holds for 15 s.
    assert first_up == (26, 0.66, 3)
    assert first_up[1] < policy.load_threshold


def test_a_one_second_blip_does_not_scale_up():
    policy = Policy(max_instances=10)
    history = [sample(t, [0.3, 0.3]) for t in range(30)]
    history.append(sample(30, [0.74, 0.74]))  # alone it asks for 3
    blip = decide(policy, history, 2)
    assert blip.desired == 2
    assert blip.reason.startswith("holding: up wanted for < 15s")
    history += [sample(t, [0.3, 0.3]) for t in range(31, 60)]
    assert [decide(policy, history[: k + 1], 2).desired for k in range(len(history))] == [2] * 60


def test_queued_sessions_scale_up_at_once_without_the_window():
    policy = Policy(max_instances=10)
    # Three seconds of history: the up window is not covered, yet 10 sessions wait.
    history = [sample(t, [0.75, 0.75], queued=10 if t == 2 else 0) for t in range(3)]
    d = decide(policy, history, 2)
    # Observed capacity 6 sessions at the threshold: 2 + ceil(10 / 6) = 4 (load alone asks 3).
    assert (d.desired, d.reason) == (4, "10 session(s) queued with 2 instance(s)")
    assert decide(policy, history[:2], 2).desired == 2  # the same load without a queue waits


@pytest.mark.parametrize(("warm", "expected"), [(0, 1), (2, 3)])
def test_cold_start_from_zero_with_a_queued_session(warm, expected):
    policy = Policy(min_instances=0, idle_to_zero=600, warm=warm)
    d = decide(policy, [Sample(0.0, (), queued=1)], 0)
    assert d.desired == expected
    assert d.reason == "cold start: a session waits"


def test_a_drop_scales_down_after_the_down_window_to_the_largest_wish_in_it():
    policy = Policy(max_instances=10)  # down_window 300

    def total_load(t: int) -> float:
        return 2.9 if t < 100 else 1.9 if t < 200 else 0.9  # wishes 6, then 4, then 2

    resizes = replay(policy, 6, total_load, range(700))
    assert [(t, n) for t, n, _ in resizes] == [(400, 4), (500, 2)]
    assert resizes[0][2] == "load fell: load 0.90 / target 0.5 per instance"


def test_scale_to_zero_after_idle_to_zero_seconds_without_a_session():
    policy = Policy(min_instances=0, idle_to_zero=120)
    resizes = replay(policy, 1, lambda t: 0.125 if t < 50 else 0.0, range(400))
    # The last session was seen at t=49: idle from t=50, zero at t=170.
    assert resizes == [(170, 0, "no session for 120s (scale to zero after 120s)")]


def test_a_queued_session_is_not_idle():
    policy = Policy(min_instances=0, idle_to_zero=10, down_window=300)
    history = [Sample(t, (InstanceSignal("i0"),)) for t in range(30)]
    history.append(Sample(30, (InstanceSignal("i0", 0.75, 6),), queued=1))
    history += [Sample(t, (InstanceSignal("i0"),)) for t in range(31, 35)]
    assert decide(policy, history, 1).desired == 1  # idle for 4 s only, since the queue


def test_scale_to_zero_waits_for_idle_to_zero_even_when_longer_than_the_down_window():
    policy = Policy(min_instances=0, idle_to_zero=600, down_window=300)
    resizes = replay(policy, 1, lambda t: 0.125 if t < 50 else 0.0, range(900))
    assert [(t, n) for t, n, _ in resizes] == [(650, 0)]


@pytest.mark.parametrize("warm", [0, 1])
def test_a_queued_session_starts_one_instance_not_one_per_second_of_start_delay(warm):
    policy = Policy(min_instances=0, idle_to_zero=600, warm=warm)
    history = [Sample(0.0, (), queued=1)]
    current = decide(policy, history, 0).desired
    assert current == 1 + warm
    sizes = []
    for t in range(1, 8):  # the instance takes 8 s to register; the session waits meanwhile
        starting = tuple(InstanceSignal(f"i{k}", registered=False) for k in range(current))
        history.append(Sample(float(t), starting, queued=1))
        current = decide(policy, history, current).desired
        sizes.append(current)
    assert sizes == [1 + warm] * 7


def test_a_queue_is_not_asked_for_again_while_its_instances_start():
    policy = Policy(max_instances=20)
    full = [InstanceSignal(f"i{k}", 0.75, 6) for k in range(2)]
    history = [Sample(0.0, tuple(full), queued=10)]
    assert decide(policy, history, 2).desired == 4  # 2 + ceil(10 / 6)
    starting = tuple(InstanceSignal(f"s{k}", registered=False) for k in range(2))
    for t in range(1, 8):
        history.append(Sample(float(t), (*full, *starting), queued=10))
        assert decide(policy, history, 4).desired == 4, t
    history.append(Sample(8.0, (*full, *starting), queued=14))  # 2 more than they will take
    assert decide(policy, history, 4).desired == 5


def test_a_held_decision_still_reports_what_the_latest_sample_wants():
    policy = Policy(max_instances=10)
    history = [sample(t, [0.3, 0.3]) for t in range(30)]
    history.append(sample(30, [0.74, 0.74]))
    assert decide(policy, history, 2).wanted == 3


def test_bounds_cap_at_max_and_keep_min():
    capped = decide(Policy(max_instances=3), [sample(0, [0.75, 0.75], queued=30)], 2)
    assert capped.desired == 3
    assert capped.wanted == 7  # 2 + ceil(30 / 6)
    assert capped.reason.endswith("; capped at max 3")

    policy = Policy(min_instances=2, max_instances=10, down_window=60)
    resizes = replay(policy, 5, lambda t: 0.0, range(100))
    assert resizes == [(60, 2, "load fell: load 0.00 / target 0.5 per instance; kept at min 2")]


def test_no_samples_keeps_the_current_size_within_bounds():
    assert decide(Policy(min_instances=2), [], 1) == Decision(2, "no signals yet")
    assert decide(Policy(min_instances=2), [], 4).desired == 4


def test_pick_victims_takes_idle_instances_first_then_the_least_busy():
    instances = [
        InstanceSignal("busy3", 0.375, 3),
        InstanceSignal("idle", 0.0, 0),
        InstanceSignal("busy1", 0.125, 1),
        InstanceSignal("starting", registered=False),
    ]
    assert [i.id for i in pick_victims(instances, 2)] == ["starting", "idle"]
    assert [i.id for i in pick_victims(instances, 3)] == ["starting", "idle", "busy1"]
    assert pick_victims(instances, 0) == []
    assert len(pick_victims(instances, 9)) == 4


def test_pick_victims_never_takes_a_busy_instance_while_an_idle_one_stays():
    rng = random.Random(7)
    for _ in range(300):
        instances = [
            InstanceSignal(f"i{k}", s / CAPACITY, s, rng.random() > 0.2)
            for k, s in enumerate(rng.choice([0, 0, 1, 3, 6]) for _ in range(rng.randint(1, 8)))
        ]
        instances = [
            i if i.registered else InstanceSignal(i.id, registered=False) for i in instances
        ]
        for count in range(len(instances) + 1):
            chosen = pick_victims(instances, count)
            assert len(chosen) == count
            idle_left = [i for i in instances if i.sessions == 0 and i not in chosen]
            if idle_left:
                assert all(i.sessions == 0 for i in chosen), (instances, count, chosen)


def recording(seed: int, seconds: int) -> list[Sample]:
    """A made-up history: a random walk of the load, instances following it, queues at peaks."""
    rng = random.Random(seed)
    samples, total, n = [], 1.0, 2
    for t in range(seconds):
        total = min(8.0, max(0.0, total + rng.uniform(-0.2, 0.22)))
        n = max(1, min(12, round(total / 0.5) + rng.choice([-1, 0, 1])))
        per = total / n
        queued = rng.randint(1, 4) if per >= 0.75 else 0
        samples.append(spread(t, n, min(per, 0.75) * n, queued))
    return samples


def test_replaying_a_recording_gives_the_same_decisions():
    policy = Policy(max_instances=12, down_window=60)
    recorded = recording(3, 600)
    stored = json.dumps([asdict(s) for s in recorded])  # as a decision log would keep it
    reloaded = [
        Sample(d["at"], tuple(InstanceSignal(**i) for i in d["instances"]), d["queued"])
        for d in json.loads(stored)
    ]

    def decisions(samples: list[Sample]) -> list[Decision]:
        return [
            decide(policy, samples[: k + 1], len(samples[k].instances)) for k in range(len(samples))
        ]

    first = decisions(recorded)
    assert decisions(recorded) == first
    assert decisions(reloaded) == first
    # The recording exercises more than one branch, or equality would prove little.
    kinds = {d.reason.split(":")[0].split(" ")[0] for d in first}
    assert {"holding", "steady", "load"} <= kinds
    assert any(d.desired > len(s.instances) for d, s in zip(first, recorded, strict=True))
    assert any(d.desired < len(s.instances) for d, s in zip(first, recorded, strict=True))


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"min_instances": 3, "max_instances": 2}, "need 0 <= min_instances <= max_instances"),
        ({"min_instances": -1}, "need 0 <= min_instances <= max_instances"),
        ({"scale_up_load": 0.8}, "need 0 < scale_up_load <= load_threshold <= 1"),
        ({"scale_up_load": 0}, "need 0 < scale_up_load <= load_threshold <= 1"),
        ({"load_threshold": 1.2}, "need 0 < scale_up_load <= load_threshold <= 1"),
        ({"up_window": -1}, "stabilization windows must be >= 0 seconds"),
        ({"down_window": -5}, "stabilization windows must be >= 0 seconds"),
        ({"sessions_per_instance": 0}, "sessions_per_instance must be >= 1"),
        ({"min_instances": 0, "idle_to_zero": -1}, "idle_to_zero must be >= 0 seconds"),
        ({"idle_to_zero": 60}, "scale to zero (idle_to_zero) needs min_instances = 0"),
        ({"warm": -1}, "warm must be >= 0"),
    ],
)
def test_policy_rejects_inconsistent_settings(fields, problem):
    with pytest.raises(ValueError) as e:
        Policy(**fields)
    assert problem in str(e.value).split("; ")


def test_policy_reports_every_problem_at_once_and_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"^need 0 <= min_instances <= max_instances; warm must"):
        Policy(min_instances=5, max_instances=1, warm=-1)
    with pytest.raises(ValueError, match="unknown policy fields: bogus, max"):
        Policy.from_dict({"max": 3, "bogus": 1})
    policy = Policy(min_instances=0, idle_to_zero=300, warm=1, sessions_per_instance=4)
    assert Policy.from_dict(policy.to_dict()) == policy


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"max_instances": "3"}, "max_instances must be a whole number (got '3')"),
        ({"max_instances": 2.5}, "max_instances must be a whole number (got 2.5)"),
        ({"scale_up_load": True}, "scale_up_load must be a number (got True)"),
        ({"down_window": float("nan")}, "down_window must be a number (got nan)"),
        ({"max_instances": float("inf")}, "max_instances must be a whole number (got inf)"),
    ],
)
def test_policy_from_json_rejects_values_that_are_not_numbers(fields, problem):
    # Not a TypeError deep inside `decide` a second later, in the autoscaler's loop.
    with pytest.raises(InvalidRequest, match=re.escape(problem)):
        Policy.from_dict(fields)


def recent(ended: int, failed: int) -> Window:
    reasons = (("RuntimeError: v2 is broken", failed),) if failed else ()
    return Window(ended, failed, ended, (0.1,) * ended, failure_reasons=reasons)


def test_a_version_whose_recent_sessions_mostly_fail_is_not_scaled_up():
    guard = FailureGuard()
    why = failing(recent(8, 6), guard)
    assert why == "6/8 recent sessions failed (75%): RuntimeError: v2 is broken (6)"
    assert failing(recent(8, 3), guard) is None  # most succeed
    assert failing(recent(4, 4), guard) is None  # too few to say
    assert failing(recent(10, 5), guard) is not None  # half is "mostly" enough

    policy = Policy(min_instances=1, max_instances=5, up_window=0)
    busy = [sample(0, [0.9, 0.9])]  # load 1.8 at target 0.5: 4 instances wanted
    wished = decide(policy, busy, 2)
    assert wished.desired == 4
    held = hold_failing(policy, wished, 2, why)
    assert held.desired == 2 and held.wanted == wished.wanted
    assert held.reason == f"holding at 2, not scaling up to 4: {why}"
    # Healthy again: scaled as before. Going down, or its minimum, is never held back.
    assert hold_failing(policy, wished, 2, None) is wished
    down = Decision(1, "load fell")
    assert hold_failing(policy, down, 2, why) is down
    assert hold_failing(Policy(min_instances=3), Decision(4, "up"), 2, why).desired == 3
    # Nothing running and a session queued: one instance, not a session waiting for nothing.
    cold = Decision(3, "cold start: a session waits")
    assert hold_failing(Policy(min_instances=0), cold, 0, why, queued=2).desired == 1


def test_each_decision_names_its_kind_from_a_fixed_set_for_the_metrics():
    policy = Policy(min_instances=0, max_instances=4, up_window=0, down_window=10)
    assert decide(policy, [], 1).kind == "no_signals"
    assert decide(policy, [spread(0, 0, 0.0, queued=2)], 0).kind == "cold_start"
    assert decide(policy, [sample(0, [0.9, 0.9])], 2).kind == "scale_up"
    assert decide(policy, [sample(0, [0.2])], 1).kind == "steady"
    falling = [spread(t, 3, 0.3) for t in range(12)]
    assert decide(policy, falling, 3).kind == "scale_down"
    assert decide(policy, falling[-5:], 3).kind == "holding"  # down wanted for < the window
    idle = Policy(min_instances=0, idle_to_zero=5)
    assert decide(idle, [spread(t, 1, 0.0) for t in range(7)], 1).kind == "idle_to_zero"
    why = "5/5 recent sessions failed (100%)"
    held = hold_failing(policy, decide(policy, [sample(0, [0.9, 0.9])], 2), 2, why)
    assert held.kind == "held_failing"
    assert {"no_signals", "cold_start", "scale_up", "scale_down", "holding", "steady"} < set(KINDS)
