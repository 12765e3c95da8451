"""Autoscaling simulator: voicefleet's real policy against Kubernetes HPAs, on simulated workers.

    python benchmarks/autoscale/run.py                    # all shapes, table + PNGs in out/
    python benchmarks/autoscale/run.py --shape spike      # one shape
    python benchmarks/autoscale/run.py --seed 7 --durations lognormal

Simulated time in 1 s ticks, seeded, deterministic: the same flags print the same table. Each
shape's sessions are drawn once, so every policy sees the same arrivals and durations. The
voicefleet policy is `voicefleet.autoscale.policy.decide` itself, sampled the way the server's
loop samples it; see README.md for what is modelled and assumed.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# Last, so that an installed voicefleet, or one on PYTHONPATH (to try a changed policy), wins.
sys.path.append(str(Path(__file__).resolve().parents[2] / "src"))
import shapes
from scalers import CpuHpa, FairHpa, Voicefleet
from sim import Stats, World, simulate, workload

from voicefleet.autoscale.policy import Policy

HERE = Path(__file__).resolve().parent
SHAPES = ("daily", "spike", "decline")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--shape", choices=SHAPES, action="append", help="shape to run (repeatable; default: all)"
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--out",
        type=Path,
        default=HERE / "out",
        help="directory for PNGs, results.json and decision logs",
    )
    p.add_argument("--no-plot", action="store_true", help="print the table only")

    load = p.add_argument_group("load")
    load.add_argument(
        "--peak-rate", type=float, default=0.5, help="session arrivals per second at peak"
    )
    load.add_argument(
        "--mean-duration", type=float, default=180.0, help="mean session length, seconds"
    )
    load.add_argument("--durations", choices=("exp", "lognormal"), default="exp")
    load.add_argument("--sigma", type=float, default=1.0, help="sigma of the lognormal durations")
    load.add_argument(
        "--daily-hours", type=float, default=2.0, help="simulated length of the compressed day"
    )
    load.add_argument(
        "--daily-low", type=float, default=0.05, help="night rate as a fraction of peak"
    )
    load.add_argument("--spike-factor", type=float, default=10.0)
    load.add_argument("--spike-minutes", type=float, default=10.0)
    load.add_argument("--decline-minutes", type=float, default=60.0)
    load.add_argument(
        "--decline-wake",
        type=float,
        default=0.1,
        help="rate after the idle half hour, fraction of peak (0: none)",
    )

    workers = p.add_argument_group("workers and dispatcher")
    workers.add_argument("--capacity", type=int, default=8, help="sessions at load 1.0")
    workers.add_argument(
        "--start-delay", type=int, default=8, help="seconds from start to registered"
    )
    workers.add_argument(
        "--dispatch",
        choices=("round-robin", "pack"),
        default="round-robin",
        help="how the dispatcher picks among available workers (voicefleet's: round-robin)",
    )
    workers.add_argument(
        "--queue-timeout", type=int, default=60, help="seconds before a queued session is refused"
    )

    policy = p.add_argument_group("voicefleet policy (the same for every shape)")
    policy.add_argument("--min-instances", type=int, default=0)
    policy.add_argument("--max-instances", type=int, default=40, help="also the HPA's maxReplicas")
    policy.add_argument("--idle-to-zero", type=float, default=600.0, help="seconds; <0 for none")
    policy.add_argument("--warm", type=int, default=0)
    policy.add_argument("--scale-up-load", type=float, default=0.5)
    policy.add_argument(
        "--load-threshold", type=float, default=0.75, help="workers turn FULL here (both policies)"
    )
    policy.add_argument("--up-window", type=float, default=15.0)
    policy.add_argument("--down-window", type=float, default=300.0)

    hpa = p.add_argument_group("CPU HPA baseline")
    hpa.add_argument(
        "--hpa-targets", default="0.7,0.3", help="target CPU utilizations, one baseline each"
    )
    hpa.add_argument(
        "--hpa-cpu-per-load",
        type=float,
        default=0.6,
        help="CPU utilization (of the request) per unit of worker load",
    )
    hpa.add_argument("--hpa-noise", type=float, default=0.03, help="std dev of the CPU reading")
    hpa.add_argument("--hpa-grace", type=int, default=30, help="terminationGracePeriodSeconds")
    hpa.add_argument("--hpa-min", type=int, default=1, help="minReplicas (the HPA cannot go to 0)")

    fair = p.add_argument_group("fair HPA (the workers' load as a Pods metric, removed pods drain)")
    fair.add_argument(
        "--fair-target",
        type=float,
        default=0.5,
        help="target average load (sessions / capacity); <=0 leaves the fair HPA out",
    )
    fair.add_argument(
        "--fair-grace",
        type=int,
        default=0,
        help="terminationGracePeriodSeconds; 0: one second longer than the shape's longest session",
    )
    return p.parse_args(argv)


def pct(values: list[int], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))])


def summary(s: Stats) -> dict[str, float]:
    queued = [w for w in s.waits if w > 0]
    return {
        "peak_instances": s.peak_instances,
        "instance_minutes": round(s.instance_seconds / 60, 1),
        "served": s.served,
        "queued": len(queued),
        "wait_p50_queued": pct(queued, 50),
        "wait_p99_queued": pct(queued, 99),
        "wait_p99_all": pct(s.waits, 99),
        "wait_p50_all": pct(s.waits, 50),
        "wait_p95_all": pct(s.waits, 95),
        "wait_max": float(max(s.waits, default=0)),
        "leaving_minutes": round(s.leaving_seconds / 60, 1),
        "lost": s.refused + s.dropped,
        "refused": s.refused,
        "dropped": s.dropped,
        "queue_seconds": s.queue_seconds,
        "resizes": s.resizes,
    }


COLUMNS = [
    ("peak_instances", "peak inst", "{:.0f}"),
    ("instance_minutes", "inst-min", "{:.0f}"),
    ("leaving_minutes", "drain-min", "{:.0f}"),
    ("served", "served", "{:.0f}"),
    ("queued", "queued", "{:.0f}"),
    ("wait_p50_queued", "wait p50 q", "{:.0f}"),
    ("wait_p99_queued", "wait p99 q", "{:.0f}"),
    ("wait_p50_all", "wait p50", "{:.0f}"),
    ("wait_p95_all", "wait p95", "{:.0f}"),
    ("wait_p99_all", "wait p99", "{:.0f}"),
    ("wait_max", "wait max", "{:.0f}"),
    ("refused", "refused", "{:.0f}"),
    ("dropped", "dropped", "{:.0f}"),
    ("lost", "lost", "{:.0f}"),
    ("queue_seconds", "s w/ queue", "{:.0f}"),
    ("resizes", "resizes", "{:.0f}"),
]


def table(rows: list[tuple[str, str, dict[str, float]]]) -> str:
    head = ["shape", "policy", *(c[1] for c in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for shape, policy, r in rows:
        cells = [shape, policy]
        for key, _, fmt in COLUMNS:
            v = r[key]
            cells.append("-" if isinstance(v, float) and math.isnan(v) else fmt.format(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    world = World(
        capacity=args.capacity,
        load_threshold=args.load_threshold,
        start_delay=args.start_delay,
        queue_timeout=args.queue_timeout,
        mean_duration=args.mean_duration,
        durations=args.durations,
        dispatch=args.dispatch,
        sigma=args.sigma,
    )
    policy = Policy(
        min_instances=args.min_instances,
        max_instances=args.max_instances,
        scale_up_load=args.scale_up_load,
        load_threshold=args.load_threshold,
        up_window=args.up_window,
        down_window=args.down_window,
        idle_to_zero=args.idle_to_zero if args.idle_to_zero >= 0 else None,
        warm=args.warm,
    )
    targets = [float(x) for x in args.hpa_targets.split(",") if x.strip()]
    chosen = {
        "daily": shapes.daily(args.peak_rate, args.daily_hours, args.daily_low),
        "spike": shapes.spike(args.peak_rate, args.spike_factor, args.spike_minutes),
        "decline": shapes.decline(args.peak_rate, args.decline_minutes, args.decline_wake),
    }
    rows: list[tuple[str, str, dict[str, float]]] = []
    if not args.no_plot:
        args.out.mkdir(parents=True, exist_ok=True)
    for name in args.shape or SHAPES:
        shape = chosen[name]
        load = workload(shape, world, args.seed)
        # Every policy starts from the same fleet: enough instances at the target load for the
        # sessions already running, all registered.
        initial = max(1, math.ceil(len(load.prefill) / (world.capacity * policy.scale_up_load)))
        runs: dict[str, Stats] = {}
        vf = Voicefleet(policy)
        runs[vf.name] = simulate(shape, load, world, vf, initial)
        for target in targets:
            hpa = CpuHpa(
                target,
                random.Random(f"{args.seed}:{name}:hpa:{target}"),
                min_replicas=args.hpa_min,
                max_replicas=args.max_instances,
                cpu_per_load=args.hpa_cpu_per_load,
                noise=args.hpa_noise,
                grace=args.hpa_grace,
                name=f"cpu-hpa {target:.0%}",
            )
            runs[hpa.name] = simulate(shape, load, world, hpa, initial)
        if args.fair_target > 0:
            longest = max([d for ds in load.arrivals for d in ds] + load.prefill, default=0)
            fair = FairHpa(
                args.fair_target,
                args.fair_grace or longest + 1,
                random.Random(f"{args.seed}:{name}:fair-hpa"),
                min_replicas=args.hpa_min,
                max_replicas=args.max_instances,
                name=f"fair-hpa {args.fair_target:.0%}",
            )
            runs[fair.name] = simulate(shape, load, world, fair, initial)
        for policy_name, stats in runs.items():
            rows.append((name, policy_name, summary(stats)))
        if not args.no_plot:
            from plot import plot

            plot(shape, world, policy.scale_up_load, runs, args.out / f"{name}.png")
            with open(args.out / f"{name}-voicefleet-decisions.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["second", "from", "to", "wanted", "reason"])
                w.writerows(vf.decisions)
    print(f"seed {args.seed}; policy {policy.to_dict()}")
    print(
        f"world {asdict(world)}; HPA CPU = {args.hpa_cpu_per_load:g} x load + N(0, {args.hpa_noise:g})\n"
    )
    print(table(rows))
    if not args.no_plot:
        results = {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
        print(f"\nPNGs, results.json and voicefleet decision logs in {args.out}")
    print(f"({time.perf_counter() - began:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
