"""The autoscaling simulator's fair Kubernetes HPA (benchmarks/autoscale/scalers.py `FairHpa`)
follows the HPA's rules: the 10 % tolerance, the 300 s scale-down stabilization window, the
scale-up rate limit, and pods removed on a scale-down drain (keep their sessions and count as
instances until the last one ends) instead of being cut. Fast, in process, simulated time."""

from __future__ import annotations

import random
import sys

from tests.support import ROOT

sys.path.insert(0, str(ROOT / "benchmarks" / "autoscale"))
from scalers import FairHpa
from sim import Fleet, World

WORLD = World(capacity=10, load_threshold=1.0, start_delay=8)


def fleet_with(loads: list[int]) -> Fleet:
    """Registered pods holding `loads[k]` sessions each, every session ending at second 10_000."""
    fleet = Fleet(WORLD, WORLD.start_delay)
    fleet.start(0, len(loads), ready_at=0)
    for pod, n in zip(fleet.instances, loads, strict=True):
        pod.ends = [10_000] * n
    return fleet


def hpa(**kw: int) -> FairHpa:
    return FairHpa(0.5, grace=20_000, rng=random.Random(1), max_replicas=100, **kw)


def test_within_the_tolerance_nothing_changes_and_outside_it_desired_is_ceil_of_the_ratio() -> None:
    fleet = fleet_with([5, 5, 5, 6])  # mean load 0.525: ratio 1.05, within 0.1
    h = hpa()
    h.step(0, fleet)
    assert len(fleet.live()) == 4
    fleet = fleet_with([4, 4, 4, 5])  # ratio 0.85: outside, down; but the window holds 4
    h = hpa()
    h.step(0, fleet)
    assert len(fleet.live()) == 4
    assert h.recommend(0, fleet, fleet.live()) == 4  # ceil(0.85 x 4) = 4
    for loads, wanted in (([4, 4, 4, 4], 4), ([3, 3, 3, 3], 3), ([0, 0, 0, 1], 1)):
        f = fleet_with(loads)  # ratios 0.8, 0.6, 0.05: ceil(3.2), ceil(2.4), ceil(0.2)
        assert h.recommend(0, f, f.live()) == wanted, loads
    fleet = fleet_with([6, 6, 5, 6])  # ratio 1.15: ceil(4.6) = 5
    h = hpa()
    h.step(0, fleet)
    assert len(fleet.live()) == 5
    fleet = fleet_with([7, 7, 7, 7])  # ratio 1.4: ceil(1.4 x 4) = 6
    h = hpa()
    h.step(0, fleet)
    assert len(fleet.live()) == 6
    assert len(fleet.instances) == 6


def test_scale_up_is_limited_to_four_pods_or_double_per_period() -> None:
    fleet = fleet_with([10, 10])  # ratio 2.0 -> 4 pods; limit max(2 + 4, 2 x 2) = 6
    h = hpa()
    h.step(0, fleet)
    assert len(fleet.live()) == 4
    fleet = fleet_with([30])  # ratio 6 -> 6 pods; limit max(1 + 4, 2 x 1) = 5
    h = hpa()
    h.step(0, fleet)
    assert len(fleet.live()) == 5
    fleet = fleet_with([10] * 3)  # ratio 2.0 -> 6; the limit is max(3 + 4, 6) = 7: 6
    h = hpa()
    h.step(0, fleet)
    assert len(fleet.live()) == 6
    fleet = fleet_with([10] * 10)  # ratio 2 -> 20; limit max(14, 20) = 20
    fleet.instances[0].ends = [10_000] * 50  # mean 1.4, ratio 2.8 -> 28: held to 20
    h = hpa()
    h.step(0, fleet)
    assert len(fleet.live()) == 20


def test_scale_down_waits_for_the_stabilization_window_and_drained_pods_keep_their_sessions() -> (
    None
):
    fleet = fleet_with([5] * 4)  # at target
    h = hpa()
    h.step(0, fleet)
    assert len(fleet.live()) == 4
    for pod in fleet.instances:  # load falls to 0.1: the metric asks for 1 pod
        pod.ends = [400]
    for t in range(15, 300, 15):
        fleet.tick(t, [])
        h.step(t, fleet)
        assert len(fleet.live()) == 4, t  # the 4 recommended at t=0 is still in the window
    fleet.tick(300, [])
    h.step(300, fleet)
    assert len(fleet.live()) == 1  # t=0 is out of the window (cutoff: after t - 300)
    leaving = [p for p in fleet.instances if p.leaving]
    assert len(leaving) == 3
    # Draining: no new session goes to them, they still hold theirs and count as instances.
    fleet.tick(301, [100, 100])
    fleet.tick(399, [])  # 99 s after the scale-down: held, not cut
    assert all(p.ends == [400] for p in leaving)
    assert len(fleet.instances) == 4
    assert fleet.stats.dropped == 0
    fleet.tick(400, [])
    assert len(fleet.instances) == 1  # they exit once their last session ended
    assert fleet.stats.dropped == 0


def test_the_replicaset_removes_unready_pods_first_then_the_most_recently_ready() -> None:
    fleet = fleet_with([1, 1])
    fleet.start(100, 1, ready_at=108)  # ready for 2 s at t=110
    fleet.start(100, 1, ready_at=500)  # not ready
    order = hpa().doomed(110, fleet.instances)
    assert [p.id for p in order[:2]] == ["i4", "i3"]
