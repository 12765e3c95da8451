"""The autoscalers under test: voicefleet's real policy, and a CPU-based Kubernetes HPA."""

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
