"""Autoscaling: per autoscaled deployment, its instances against the load and the queued
sessions over the last minutes, and each decision with its reason, from the autoscaler's own
in-memory history (`Autoscaler.history`: it starts empty when the server starts)."""

from __future__ import annotations

import time

from voicefleet.autoscale.loop import Autoscaler
from voicefleet.control.service import ControlPlane
from voicefleet.dashboard.chart import Series, line_chart
from voicefleet.dashboard.html import Html, badge, el, esc, join, table, when

WINDOW = 600.0  # seconds the charts show
DECISIONS = 30  # decisions listed per deployment


def _policy(policy: dict[str, object]) -> str:
    shown = ("min_instances", "max_instances", "scale_up_load", "sessions_per_instance",
             "idle_to_zero", "warm")  # fmt: skip
    return " · ".join(f"{k} {policy[k]}" for k in shown if policy.get(k) is not None)


async def render_autoscaling(plane: ControlPlane, scaler: Autoscaler) -> Html:
    now = time.time()
    since = now - WINDOW
    parts: list[Html] = []
    for agent, _ in await plane.agents_serving():
        for dep in await plane.deployments(agent):
            points, decisions = scaler.history(agent.id, dep.name)
            if dep.autoscale is None and not points:
                continue
            recent = [p for p in points if p.at >= since]
            counts = line_chart(
                [
                    Series("instances", [(p.at, p.instances) for p in recent], step=True),
                    Series("desired", [(p.at, p.desired) for p in recent], step=True, dash=True),
                    Series("sessions", [(p.at, p.sessions) for p in recent], colour="c2"),
                    Series("queued", [(p.at, p.queued) for p in recent], colour="c1"),
                ],
                since,
                now,
                f"{agent.name}/{dep.name}: instances, sessions and queued sessions",
            )
            load = line_chart(
                [Series("load", [(p.at, p.load) for p in recent], colour="c3")],
                since,
                now,
                f"{agent.name}/{dep.name}: load (sum of the instances' reported loads)",
                ymax=1.0,
            )
            latest = recent[-1] if recent else None
            head = el(
                "p",
                badge("autoscaled", "ready") if dep.autoscale else badge("fixed size"),
                " ",
                _policy(dep.autoscale or {}) or f"{dep.replicas} instance(s)",
                join(
                    (
                        f" · now {latest.instances} instance(s), {latest.sessions} session(s), "
                        f"{latest.queued} queued, load {latest.load:.2f}",
                    )
                )
                if latest
                else el("span", " · no samples yet", class_="muted"),
            )
            rows = [
                [
                    when(d.at),
                    f"{d.instances} → {d.desired}" if d.desired != d.instances else "stay",
                    d.reason,
                    el("small", f"held back: {d.held}") if d.held else "",
                ]
                for d in decisions[:DECISIONS]
            ]
            parts.append(
                el(
                    "section",
                    el(
                        "h2",
                        el("a", agent.name, href=f"/dashboard/agents/{agent.name}"),
                        f" / {dep.name}",
                    ),
                    head,
                    el("div", counts, load, class_="charts"),
                    el("h3", "Decisions"),
                    table(["when", "size", "reason", ""], rows),
                    class_="autoscaled",
                    id=f"autoscale-{agent.name}-{dep.name}",
                )
            )
    if not parts:
        return el(
            "p",
            "No deployment is autoscaled: `vf agent scale --min 1 --max 5` turns it on.",
            class_="empty",
        )
    return esc(join(parts))
