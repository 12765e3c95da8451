"""What the per-agent metrics cost: on the dispatch hot path, and per scrape.

    .venv/bin/python benchmarks/metrics/cost.py

Hot path: jobs of a known agent, served by a managed instance, go through their life (pending,
assigned, running, succeeded) in the dispatcher's job book, with the metrics' job listener and
without it; the difference is the listener's cost per session. Scrape: `/metrics`' body
(`generate_latest`) with 10,000 live sessions of 10 agents, 3 versions each, in memory. Both in
this one process, no server: the store's catalog is set as a refresh would leave it.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
from prometheus_client import generate_latest

from voicefleet.config import DispatchSettings, Project
from voicefleet.control.telemetry import Telemetry, _Catalog
from voicefleet.dispatch.jobs import Job, JobState
from voicefleet.dispatch.service import DispatchService
from voicefleet.metrics import Metrics
from voicefleet.runtime import InstanceSpec, InstanceState

AGENTS, VERSIONS, LIVE = 10, 3, 10_000


def setup() -> tuple[DispatchService, Telemetry, Metrics]:
    metrics = Metrics()
    service = DispatchService(Project("p", "k", "s"), DispatchSettings(), metrics)
    states = {}
    for a in range(AGENTS):
        for v in range(1, VERSIONS + 1):
            spec = InstanceSpec(
                instance_id=f"i{a}-{v}", agent_id=f"CA_{a}", version=f"v{v}", workdir=Path("."),
                python=Path("python"), env={}, log_dir=Path("."), grace_period=0,
                deployment="production",
            )  # fmt: skip
            states[spec.instance_id] = InstanceState(spec)
    fleet = SimpleNamespace(runtime=SimpleNamespace(on_change=lambda f: None), state=states.get)
    telemetry = Telemetry(metrics, None, service, fleet, SimpleNamespace(last=lambda a, d: None))  # type: ignore[arg-type]
    names = {f"CA_{a}": f"agent-{a}" for a in range(AGENTS)}
    telemetry.catalog = _Catalog(
        names=names,
        ids={n: i for i, n in names.items()},
        pairs=frozenset((i, "production") for i in names),
    )
    return service, telemetry, metrics


def job(n: int) -> Job:
    a, v = n % AGENTS, n % VERSIONS + 1
    j = Job(id=f"AJ_{n}", dispatch_id=f"AD_{n}", agent_name=f"agent-{a}", room=f"r{n}", room_sid="")
    j.agent_id, j.version, j.instance = f"CA_{a}", f"v{v}", f"i{a}-{v}"
    return j


def lifecycle_us(service: DispatchService, n: int) -> float:
    book = service.book
    began = time.perf_counter()
    for i in range(n):
        j = job(i)
        book.add_job(j)
        for state in (JobState.ASSIGNED, JobState.RUNNING, JobState.SUCCEEDED):
            book.transition(j, state)
    return (time.perf_counter() - began) / n * 1e6


def main() -> None:
    n, runs = 20_000, 7
    with_, without = [], []
    for _ in range(runs):
        service, telemetry, _ = setup()
        with_.append(lifecycle_us(service, n))
        service, telemetry, _ = setup()
        service.book.job_listeners.remove(telemetry.job_changed)
        without.append(lifecycle_us(service, n))
    w, wo = statistics.median(with_), statistics.median(without)
    print(f"session lifecycle in the job book, median of {runs} x {n:,}:")
    print(f"  with the metrics listener {w:.1f} us, without {wo:.1f} us: +{w - wo:.1f} us/session")

    service, telemetry, metrics = setup()
    for i in range(LIVE):
        j = job(i)
        service.book.add_job(j)
        service.book.transition(j, JobState.ASSIGNED)
        service.book.transition(j, JobState.RUNNING)
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        body = generate_latest(metrics.registry)
        times.append((time.perf_counter() - began) * 1e3)
    retire = []
    for _ in range(runs):
        began = time.perf_counter()
        telemetry._retire(telemetry.catalog, time.monotonic())
        retire.append((time.perf_counter() - began) * 1e3)
    print(
        f"a store refresh's pass over {LIVE:,} open sessions (which versions still run): "
        f"{statistics.median(retire):.1f} ms (median of {runs}), once a minute at most"
    )
    print(
        f"/metrics body with {LIVE:,} live sessions ({AGENTS} agents x {VERSIONS} versions): "
        f"{statistics.median(times):.1f} ms (median of {runs}), {len(body):,} bytes"
    )


if __name__ == "__main__":
    main()
