"""One PNG per shape: load, instances, queue and lost sessions of every policy, on one time axis."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from shapes import Shape
from sim import Stats, World


def plot(
    shape: Shape, world: World, target_load: float, runs: dict[str, Stats], path: Path
) -> None:
    minutes = [t / 60 for t in range(shape.seconds)]
    fig, (rate_ax, inst_ax, queue_ax, lost_ax) = plt.subplots(
        4, 1, figsize=(11, 10), sharex=True, height_ratios=[2, 3, 2, 2]
    )
    fig.suptitle(f"{shape.name}: {shape.about}")

    first = next(iter(runs.values()))
    rate_ax.plot(minutes, [r * 60 for r in first.rate], color="black", lw=1)
    rate_ax.set_ylabel("arrivals / min")
    sessions_ax = rate_ax.twinx()
    for name, s in runs.items():
        sessions_ax.plot(minutes, s.sessions, lw=0.8, alpha=0.7, label=f"sessions ({name})")
    sessions_ax.set_ylabel("sessions running")
    sessions_ax.legend(loc="upper right", fontsize=8)

    per_instance = world.capacity * target_load
    needed = [r * world.mean_duration / per_instance for r in first.rate]
    inst_ax.plot(
        minutes, needed, color="grey", ls="--", lw=1, label=f"offered load / {per_instance:g}"
    )
    for name, s in runs.items():
        inst_ax.plot(minutes, s.instances, lw=1.2, drawstyle="steps-post", label=name)
    inst_ax.set_ylabel("instances running")
    inst_ax.legend(loc="upper right", fontsize=8)

    for name, s in runs.items():
        queue_ax.plot(minutes, s.queued, lw=1, label=name)
    queue_ax.set_ylabel("sessions queued")
    queue_ax.legend(loc="upper right", fontsize=8)

    for name, s in runs.items():
        lost_ax.plot(minutes, s.lost, lw=1.2, drawstyle="steps-post", label=name)
    lost_ax.set_ylabel("refused + dropped\n(cumulative)")
    lost_ax.set_xlabel("simulated minutes")
    lost_ax.legend(loc="upper left", fontsize=8)

    for ax in (rate_ax, inst_ax, queue_ax, lost_ax):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
