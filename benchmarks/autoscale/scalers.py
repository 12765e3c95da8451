"""The autoscalers under test: voicefleet's real policy, a CPU Kubernetes HPA and a fair one."""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field

from sim import Fleet, Instance

from voicefleet.autoscale.policy import InstanceSignal, Policy, Sample, decide, pick_victims


@dataclass
class Voicefleet:
    """`voicefleet.autoscale.policy.decide` driven the way `autoscale/loop.py` drives it.

    Each second: a `Sample` of the instances that count towards the size (starting ones
    unregistered, draining ones left out), the history trimmed as the loop trims it, `decide`,
    then start instances or drain `pick_victims`.
    """

    policy: Policy
    name: str = "voicefleet"
    history: deque[Sample] = field(default_factory=deque)
    # (second, from, to, wanted, reason) of every resize, for the decisions log.
    decisions: list[tuple[int, int, int, int, str]] = field(default_factory=list)

    def step(self, t: int, fleet: Fleet) -> None:
        live = fleet.live()
        sample = Sample(float(t), tuple(self._signal(fleet, i, t) for i in live), len(fleet.queue))
        self.history.append(sample)
        p = self.policy
        keep = max(p.up_window, p.down_window, p.idle_to_zero or 0) + 5
        while self.history and self.history[0].at < t - keep:
            self.history.popleft()
        d = decide(p, self.history, len(live))
        if d.desired == len(live):
            return
        self.decisions.append((t, len(live), d.desired, d.wanted, d.reason))
        if d.desired > len(live):
            fleet.start(t, d.desired - len(live))
            return
        for victim in pick_victims(sample.instances, len(live) - d.desired):
            fleet.find(victim.id).draining = True

    @staticmethod
    def _signal(fleet: Fleet, i: Instance, t: int) -> InstanceSignal:
        if not i.registered(t):
            return InstanceSignal(i.id, registered=False)
        return InstanceSignal(i.id, fleet.load(i), len(i.ends), True)


@dataclass
class CpuHpa:
    """A `HorizontalPodAutoscaler` on CPU utilization with Kubernetes' default behaviour.

    Every `sync` seconds: utilization of each ready pod = `cpu_per_load` x its load + Gaussian
    noise (relative to the pod's CPU request); desired = ceil(replicas x mean / target), none
    within `tolerance`; pods still starting count as 0 % on the way up (as the HPA does for
    unready pods) and are left out on the way down. Up: at once, at most max(2x, +4) pods per
    sync. Down: the largest recommendation over `down_window` (stabilization). On a
    scale-down the ReplicaSet deletes unready pods first, then the newest, whatever sessions
    they hold; a deleted pod takes no new session and is killed after `grace` seconds
    (terminationGracePeriodSeconds), cutting the sessions still on it.
    """

    target: float
    rng: random.Random
    min_replicas: int = 1
    max_replicas: int = 10
    cpu_per_load: float = 0.6
    noise: float = 0.03
    grace: int = 30
    sync: int = 15
    tolerance: float = 0.1
    down_window: int = 300
    name: str = "cpu-hpa"
    recommendations: deque[tuple[int, int]] = field(default_factory=deque)

    def step(self, t: int, fleet: Fleet) -> None:
        if t % self.sync:
            return
        pods = fleet.live()
        current = len(pods)
        if not self.recommendations:  # as if it had run at this size before the simulation
            self.recommendations.append((t, current))
        desired = self._recommend(t, fleet, pods)
        self.recommendations.append((t, desired))
        while self.recommendations[0][0] < t - self.down_window:
            self.recommendations.popleft()
        if desired < current:
            desired = min(current, max(r for _, r in self.recommendations))
        desired = min(desired, max(2 * current, current + 4))
        desired = max(self.min_replicas, min(self.max_replicas, desired))
        if desired > current:
            fleet.start(t, desired - current)
        elif desired < current:
            # ReplicaSet's deletion order: not ready first, then the most recently started.
            doomed = sorted(pods, key=lambda i: (i.registered(t), -i.started))
            for pod in doomed[: current - desired]:
                pod.kill_at = t + self.grace

    def _recommend(self, t: int, fleet: Fleet, pods: list[Instance]) -> int:
        ready = [p for p in pods if p.registered(t)]
        if not ready:
            return len(pods)
        usage = [
            max(0.0, self.cpu_per_load * fleet.load(p) + self.rng.gauss(0, self.noise))
            for p in ready
        ]
        ratio = sum(usage) / len(ready) / self.target
        if abs(ratio - 1) <= self.tolerance:
            return len(pods)
        if ratio > 1 and len(ready) < len(pods):
            ratio = sum(usage) / len(pods) / self.target
            if ratio <= 1 + self.tolerance:
                return len(pods)
            return math.ceil(ratio * len(pods))
        return math.ceil(ratio * len(ready))


@dataclass
class FairHpa:
    """A `HorizontalPodAutoscaler` (autoscaling/v2) done as well as Kubernetes allows: a Pods
    metric of the workers' own load (sessions / capacity, served by a custom metrics adapter),
    target average `target`, and pods that drain when they are removed.

    The rules, as pkg/controller/podautoscaler implements them (replica_calculator.go
    `calcPlainMetricReplicas`, horizontal.go `normalizeDesiredReplicasWithBehaviors`):

    - every `sync` seconds (--horizontal-pod-autoscaler-sync-period, 15 s);
    - pods being deleted are ignored; pods not yet ready (Pending / starting) are left out of
      the ratio; usage ratio = mean metric of the ready pods / target;
    - within `tolerance` (0.1) of 1: no change; otherwise desired = ceil(ratio x ready pods);
      when scaling up with unready pods, those count as 0 and the ratio is recomputed over all
      pods; if that lands within the tolerance, or flips direction, no change;
    - no ready pod (no metrics): no change (the controller errors and keeps the size);
    - stabilization: the recommendation kept is the largest of the last `down_window` (300 s)
      seconds for a scale-down, the smallest of the last `up_window` (0 s) for a scale-up;
    - rate (default behaviour): up by at most max(4 pods, 100 %) per 15 s period, counting
      the pods added in the last period (selectPolicy Max); down by up to 100 % per 15 s;
    - then clamped to [minReplicas, maxReplicas].

    Scale-down: the ReplicaSet picks whom to delete without knowing sessions
    (controller.ActivePodsWithRanks): not-ready pods first, then (no pod-deletion-cost set) the
    pods ready for the shortest time, compared in powers of two of that time
    (LogarithmicScaleDown, on since 1.22), ties broken by UID, i.e. at random. A deleted pod
    gets SIGTERM: it takes no new session and keeps its sessions, and its capacity, until they
    end; `grace` (terminationGracePeriodSeconds) is longer than the longest call, so none is cut.
    """

    target: float
    grace: int
    rng: random.Random
    min_replicas: int = 1
    max_replicas: int = 10
    sync: int = 15
    tolerance: float = 0.1
    up_window: int = 0
    down_window: int = 300
    up_pods: int = 4  # scaleUp policy: Pods 4 per `period`
    up_percent: int = 100  # scaleUp policy: Percent 100 per `period`
    down_percent: int = 100  # scaleDown policy: Percent 100 per `period`
    period: int = 15
    name: str = "fair-hpa"
    recommendations: deque[tuple[int, int]] = field(default_factory=deque)
    events: deque[tuple[int, int]] = field(default_factory=deque)  # (second, replica change)

    def step(self, t: int, fleet: Fleet) -> None:
        if t % self.sync:
            return
        pods = fleet.live()  # the ReplicaSet's active pods: deleted ones are ignored
        current = len(pods)
        if not self.recommendations:  # as if it had run at this size before the simulation
            self.recommendations.append((t, current))
        desired = self.recommend(t, fleet, pods)
        desired = self._stabilize(t, current, desired)
        desired = self._rate_limit(t, current, desired)
        desired = max(self.min_replicas, min(self.max_replicas, desired))
        if desired != current:
            self.events.append((t, desired - current))
        if desired > current:
            fleet.start(t, desired - current)
        elif desired < current:
            for pod in self.doomed(t, pods)[: current - desired]:
                pod.kill_at = t + self.grace

    def recommend(self, t: int, fleet: Fleet, pods: list[Instance]) -> int:
        """`calcPlainMetricReplicas`: the replica count the metric alone asks for."""
        current = len(pods)
        ready = [fleet.load(p) for p in pods if p.registered(t)]
        unready = current - len(ready)
        if not ready:
            return current
        ratio = sum(ready) / len(ready) / self.target
        if unready == 0 or ratio <= 1.0:
            if abs(ratio - 1.0) <= self.tolerance:
                return current
            return math.ceil(ratio * len(ready))
        new_ratio = sum(ready) / current / self.target  # unready pods at 0 on the way up
        if abs(new_ratio - 1.0) <= self.tolerance or new_ratio < 1.0:
            return current
        desired = math.ceil(new_ratio * current)
        return current if desired < current else desired

    def _stabilize(self, t: int, current: int, desired: int) -> int:
        """`stabilizeRecommendationWithBehaviors`."""
        up = down = desired
        for at, r in self.recommendations:
            if at > t - self.up_window:
                up = min(up, r)
            if at > t - self.down_window:
                down = max(down, r)
        self.recommendations.append((t, desired))
        keep = max(self.up_window, self.down_window)
        while self.recommendations and self.recommendations[0][0] <= t - keep:
            self.recommendations.popleft()
        return min(max(current, up), down)

    def _rate_limit(self, t: int, current: int, desired: int) -> int:
        """`convertDesiredReplicasWithBehaviorRate` with the default policies."""
        while self.events and self.events[0][0] <= t - self.period:
            self.events.popleft()
        added = sum(d for _, d in self.events if d > 0)
        removed = -sum(d for _, d in self.events if d < 0)
        if desired > current:
            start = current - added
            limit = max(start + self.up_pods, math.ceil(start * (1 + self.up_percent / 100)))
            return min(desired, limit)
        if desired < current:
            start = current + removed
            limit = math.floor(start * (1 - self.down_percent / 100))
            return max(desired, limit)
        return desired

    def doomed(self, t: int, pods: list[Instance]) -> list[Instance]:
        """The ReplicaSet's deletion order, first to go first; blind to sessions."""

        def rank(p: Instance) -> tuple[bool, int, float]:
            if not p.registered(t):
                return (False, 0, 0.0)
            ready_for = max(1, t - p.ready_at)
            return (True, int(math.log2(ready_for)), self.rng.random())

        return sorted(pods, key=rank)
