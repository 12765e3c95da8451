"""The simulated world: sessions arriving, workers holding them, the dispatcher's queue.

Discrete time, one tick per simulated second. Each tick, in this order: sessions that are over
end; instances that are leaving and empty exit (a terminated pod past its grace period is cut,
its sessions counted as dropped); the second's arrivals join the FIFO queue; the queue is
dispatched round robin to available workers (registered, not leaving, not FULL); sessions that
have waited `queue_timeout` are refused, as the real dispatcher fails them; then the autoscaler
under test looks at the fleet and resizes it.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from shapes import Shape


@dataclass(frozen=True)
class World:
    capacity: int = 8  # sessions at load 1.0
    load_threshold: float = 0.75  # a worker turns FULL (refuses offers) at this load
    start_delay: int = 8  # seconds from starting an instance to its worker registering
    queue_timeout: int = 60
    mean_duration: float = 180.0
    durations: str = "exp"  # or "lognormal"
    dispatch: str = "round-robin"  # or "pack": the busiest available worker first
    sigma: float = 1.0  # of the lognormal


@dataclass(frozen=True)
class Workload:
    """The sessions of one run, drawn once per shape so every policy sees the same ones."""

    arrivals: list[list[int]]  # per second: the durations of the sessions arriving then
    prefill: list[int]  # sessions already running at t=0 (the run starts in steady state)


def workload(shape: Shape, world: World, seed: int) -> Workload:
    rng = random.Random(f"{seed}:{shape.name}")

    def duration() -> int:
        if world.durations == "lognormal":
            mu = math.log(world.mean_duration) - world.sigma**2 / 2
            d = rng.lognormvariate(mu, world.sigma)
        else:
            d = rng.expovariate(1 / world.mean_duration)
        return max(1, math.ceil(d))

    prefill = [duration() for _ in range(_poisson(rng, shape.rate(0) * world.mean_duration))]
    arrivals = [
        [duration() for _ in range(_poisson(rng, shape.rate(t)))] for t in range(shape.seconds)
    ]
    return Workload(arrivals, prefill)


def _poisson(rng: random.Random, lam: float) -> int:
    if lam <= 0:
        return 0
    if lam > 30:  # normal approximation; Knuth's product underflows
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    limit, k, p = math.exp(-lam), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


@dataclass
class Instance:
    id: str
    started: int
    ready_at: int
    ends: list[int] = field(default_factory=list)  # the end second of each session it holds
    draining: bool = False  # voicefleet: takes no new session, exits when its sessions end
    kill_at: int | None = None  # k8s: terminating, takes no new session, cut at this second

    def registered(self, t: int) -> bool:
        return t >= self.ready_at

    @property
    def leaving(self) -> bool:
        return self.draining or self.kill_at is not None


@dataclass
class Stats:
    served: int = 0
    waits: list[int] = field(default_factory=list)  # queue wait of every served session
    refused: int = 0
    dropped: int = 0
    queue_seconds: int = 0  # seconds ending with a session queued (no worker would take it)
    instance_seconds: int = 0
    leaving_seconds: int = 0  # of those, instances draining or terminating (holding capacity)
    peak_instances: int = 0
    resizes: int = 0  # times the autoscaler changed the size
    # Per second, for the plots.
    rate: list[float] = field(default_factory=list)
    sessions: list[int] = field(default_factory=list)
    queued: list[int] = field(default_factory=list)
    instances: list[int] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)  # refused + dropped so far


class Fleet:
    def __init__(self, world: World, start_delay: int) -> None:
        self.world = world
        self.start_delay = start_delay
        self.instances: list[Instance] = []
        self.queue: deque[tuple[int, int]] = deque()  # (arrived at, duration)
        self.stats = Stats()
        self._cursor = 0
        self._ids = itertools.count(1)

    def start(self, t: int, count: int, ready_at: int | None = None) -> None:
        for _ in range(count):
            i = Instance(
                f"i{next(self._ids)}", t, t + self.start_delay if ready_at is None else ready_at
            )
            self.instances.append(i)

    def live(self) -> list[Instance]:
        """Instances that count towards the size: starting or serving, not leaving."""
        return [i for i in self.instances if not i.leaving]

    def find(self, instance_id: str) -> Instance:
        return next(i for i in self.instances if i.id == instance_id)

    def load(self, i: Instance) -> float:
        return len(i.ends) / self.world.capacity

    def available(self, i: Instance, t: int) -> bool:
        return i.registered(t) and not i.leaving and self.load(i) < self.world.load_threshold

    def tick(self, t: int, arrivals: list[int]) -> None:
        for i in self.instances:
            if i.ends:
                i.ends = [e for e in i.ends if e > t]
            if i.kill_at is not None and t >= i.kill_at:
                self.stats.dropped += len(i.ends)
                i.ends = []
        self.instances = [i for i in self.instances if not (i.leaving and not i.ends)]
        self.queue.extend((t, d) for d in arrivals)
        while self.queue:
            target = self._pick(t)
            if target is None:
                break
            arrived, duration = self.queue.popleft()
            target.ends.append(t + duration)
            self.stats.served += 1
            self.stats.waits.append(t - arrived)
        while self.queue and t - self.queue[0][0] >= self.world.queue_timeout:
            self.queue.popleft()
            self.stats.refused += 1

    def _pick(self, t: int) -> Instance | None:
        """Round robin among available workers, as the dispatcher's `pick_worker`; or, to
        compare, packed: the busiest available one (the oldest among equals)."""
        if self.world.dispatch == "pack":
            free = [i for i in self.instances if self.available(i, t)]
            return max(free, key=lambda i: len(i.ends), default=None)
        n = len(self.instances)
        for k in range(n):
            i = self.instances[(self._cursor + k) % n]
            if self.available(i, t):
                self._cursor = (self._cursor + k + 1) % n
                return i
        return None

    def record(self, t: int, rate: float) -> None:
        s = self.stats
        running = len(self.instances)
        s.instance_seconds += running
        s.leaving_seconds += sum(i.leaving for i in self.instances)
        s.peak_instances = max(s.peak_instances, running)
        s.queue_seconds += bool(self.queue)
        s.rate.append(rate)
        s.sessions.append(sum(len(i.ends) for i in self.instances))
        s.queued.append(len(self.queue))
        s.instances.append(running)
        s.lost.append(s.refused + s.dropped)


class Scaler(Protocol):
    name: str

    def step(self, t: int, fleet: Fleet) -> None: ...


def simulate(shape: Shape, load: Workload, world: World, scaler: Scaler, initial: int) -> Stats:
    """Run `scaler` over the shape, from `initial` registered instances holding the prefill."""
    fleet = Fleet(world, world.start_delay)
    fleet.start(0, initial, ready_at=0)
    for k, d in enumerate(load.prefill):
        fleet.instances[k % initial].ends.append(d)
    for t in range(shape.seconds):
        fleet.tick(t, load.arrivals[t])
        before = len(fleet.live())
        scaler.step(t, fleet)
        fleet.stats.resizes += len(fleet.live()) != before
        fleet.record(t, shape.rate(t))
    return fleet.stats
