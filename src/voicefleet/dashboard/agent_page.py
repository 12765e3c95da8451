"""An agent's page: deployments with their traffic split and the rollout commands, the canary
beside stable while one runs, versions, instances, rollout history and events."""

from __future__ import annotations

import time
from typing import Any

from voicefleet.control.service import DEFAULT_DEPLOYMENT, ControlPlane
from voicefleet.control.status import Decisions, agent_status
from voicefleet.dashboard.chart import Series, line_chart
from voicefleet.dashboard.html import Html, badge, el, esc, join, table, when
from voicefleet.dashboard.overview import instance_counts, problems, split_bar
from voicefleet.dispatch.service import DispatchService
from voicefleet.errors import InvalidRequest
from voicefleet.rollout.canary import Thresholds
from voicefleet.rollout.model import RUNNING, RolloutState
from voicefleet.store.models import AgentRow, VersionStatus, actor_parts

# The commands an operator may give from the page, and the question each asks first.
CANARY_COMMANDS = {
    "promote": "Promote canary {to} to all of {deployment}'s traffic?",
    "pause": "Pause canary {to} on {deployment} (its share stays as it is)?",
    "resume": "Resume canary {to} on {deployment}?",
    "abort": "Abort canary {to} on {deployment}? Its sessions finish; new ones go to {frm}.",
}
ACTIONS = (*CANARY_COMMANDS, "rollback", "scale")


def who(actor: str, ip: str = "") -> str:
    """An event's actor as the pages show it: "<key> via dashboard from <ip>"; "-" for the
    platform."""
    key, where = actor_parts(actor)
    return f"{key} via {where}{f' from {ip}' if ip else ''}" if key else "-"


def scale_form(agent: str, csrf: str, deployment: str, replicas: int) -> Html:
    """A fixed size for the deployment; the question names the number typed ({replicas}).
    No form without a CSRF token (`csrf` ""): a viewer's page offers no commands."""
    if not csrf:
        return Html("")
    return el(
        "form",
        el("input", type="hidden", name="csrf", value=csrf),
        el("input", type="hidden", name="command", value="scale"),
        el("input", type="hidden", name="deployment", value=deployment),
        el(
            "input",
            type="number",
            name="replicas",
            min="0",
            max="100",
            value=str(replicas),
            aria_label=f"instances of {deployment}",
            class_="narrow",
        ),
        el("button", "scale", type="submit", class_="btn scale"),
        method="post",
        action=f"/dashboard/agents/{agent}/actions",
        data_confirm=f"Run {{replicas}} instance(s) of {deployment} (autoscaling off)? "
        "Instances that go drain: their sessions finish.",
        class_="action",
    )


def action_form(agent: str, csrf: str, action: str, question: str, **fields: str) -> Html:
    if not csrf:  # a viewer's page: no commands
        return Html("")
    hidden = [el("input", type="hidden", name=k, value=v) for k, v in fields.items()]
    return el(
        "form",
        el("input", type="hidden", name="csrf", value=csrf),
        el("input", type="hidden", name="command", value=action),
        *hidden,
        el("button", action, type="submit", class_=f"btn {action}"),
        method="post",
        action=f"/dashboard/agents/{agent}/actions",
        data_confirm=question,
        class_="action",
    )


def _short(digest: str) -> Html:
    return el("code", digest[:12], title=digest) if digest else esc("-")


TREND_POINTS = 40  # points of the canary's charts over its current step


def _canary_charts(r: dict[str, Any], dispatch: DispatchService, agent_name: str) -> Html:
    """Canary against stable over the current step (what the judge looks at, as it grew):
    failure rate and median time to start, each with the limit the canary is held to."""
    try:
        t = Thresholds(**(r["plan"].get("thresholds") or {}))
    except (TypeError, InvalidRequest):
        t = Thresholds()
    since, now = r["step_started_at"] or r["created_at"], time.time()
    canary = dispatch.over_time(agent_name, r["to_version"], since, now, TREND_POINTS)
    stable = dispatch.over_time(agent_name, r["from_version"], since, now, TREND_POINTS)
    to, frm = f"canary {r['to_version']}", f"stable {r['from_version']}"
    failures = line_chart(
        [
            Series(to, [(m, rate) for m, rate, _ in canary], colour="c1", unit="%"),
            Series(frm, [(m, rate) for m, rate, _ in stable], colour="c0", unit="%"),
            Series(
                f"limit: stable +{t.max_failure_rate_increase:.0%}",
                [(m, rate + t.max_failure_rate_increase) for m, rate, _ in stable],
                colour="bad",
                dash=True,
                unit="%",
            ),
        ],
        since,
        now,
        "failure rate of the sessions ended this step",
        ymax=0.1,
    )
    starts = line_chart(
        [
            Series(to, [(m, d) for m, _, d in canary], colour="c1", unit="s"),
            Series(frm, [(m, d) for m, _, d in stable], colour="c0", unit="s"),
            Series(
                f"limit: stable x{t.max_start_delay_ratio:g} + {t.start_delay_slack:g}s",
                [(m, d * t.max_start_delay_ratio + t.start_delay_slack) for m, _, d in stable],
                colour="bad",
                dash=True,
                unit="s",
            ),
        ],
        since,
        now,
        "time to start (median, assignment to running)",
    )
    return el("div", failures, starts, class_="charts", id=f"canary-charts-{r['deployment']}")


def _canary(r: dict[str, Any], charts: Html) -> Html:
    """The canary's numbers beside stable's, over the current step."""
    canary, stable = r["analysis"]["canary"], r["analysis"]["stable"]

    def row(label: str, key: str, fmt: str = "{}") -> list[object]:
        return [label, fmt.format(canary[key]), fmt.format(stable[key])]

    def reasons(w: dict[str, Any]) -> str:
        return "; ".join(f"{why} ({n})" for why, n in w["failure_reasons"]) or "-"

    steps = r["plan"].get("steps", [])
    return el(
        "section",
        el("h3", f"Canary {r['to_version']} vs stable {r['from_version']} on {r['deployment']}"),
        el(
            "p",
            badge(r["state"]),
            f" {r['weight']:g}% of new sessions (steps {', '.join(f'{s:g}%' for s in steps)};"
            f" now {r['step'] or '-'}) since ",
            when(r["step_started_at"]),
        ),
        table(
            ["", f"canary {r['to_version']}", f"stable {r['from_version']}"],
            [
                row("sessions ended", "ended"),
                row("failed", "failed"),
                row("failure rate", "failure_rate", "{:.1%}"),
                row("started", "started"),
                row("start delay p50 (s)", "start_delay_p50", "{:.2f}"),
                ["failure reasons", reasons(canary), reasons(stable)],
            ],
        ),
        charts,
        class_="canary",
        id=f"canary-{r['deployment']}",
    )


async def render_agent(
    plane: ControlPlane, agent: AgentRow, decision: Decisions, csrf: str
) -> Html:
    """The agent's page; `csrf` "" (a viewer) leaves every command out."""
    status = await agent_status(plane, agent, decision)
    versions = await plane.versions(agent)
    history = (await plane.rollouts(agent))[:20]
    events = await plane.events(agent, 20)
    running = {r["deployment"]: r for r in status["rollouts"] if r["state"] in RUNNING}
    name = agent.name
    parts: list[Html] = []

    found = problems(status, versions)
    if found:
        parts.append(
            el(
                "section",
                el("h2", f"Problems ({len(found)})"),
                el("ul", *(el("li", p.text) for p in found)),
                class_="problems",
            )
        )

    cards = []
    for d in status["deployments"]:
        r = running.get(d["name"])
        buttons: list[Html] = []
        if r is not None and r["strategy"] == "canary":
            words = {"to": r["to_version"], "frm": r["from_version"], "deployment": d["name"]}
            # Pause while it progresses, resume while it is paused.
            skip = "resume" if r["state"] == RolloutState.PROGRESSING else "pause"
            for command, question in CANARY_COMMANDS.items():
                if command == skip:
                    continue
                buttons.append(
                    action_form(name, csrf, command, question.format(**words), deployment=d["name"])
                )
        elif d["version"] and r is None:
            buttons.append(
                action_form(
                    name,
                    csrf,
                    "rollback",
                    f"Roll {d['name']} back from {d['version']} to the version before it?",
                    deployment=d["name"],
                )
            )
        if r is None and d["version"]:
            buttons.append(scale_form(name, csrf, d["name"], d["replicas"]))
        policy = d["autoscale"] or {}
        size = (
            f"autoscaled {policy.get('min_instances')}-{policy.get('max_instances')}"
            if policy
            else f"{d['replicas']} instance(s)"
        )
        cards.append(
            el(
                "article",
                el("h3", d["name"]),
                el(
                    "p",
                    "serving ",
                    el("b", d["version"] or "nothing yet"),
                    f" · {size}",
                    join((" · ", badge(r["state"]), f" {r['strategy']} to {r['to_version']}"))
                    if r is not None
                    else "",
                ),
                split_bar(d["routing"]),
                el("p", instance_counts(status["instances"], d["name"])),
                el("div", *buttons, class_="actions") if any(buttons) else "",
                class_="card deployment",
                id=f"deployment-{d['name']}",
            )
        )
    parts.append(el("section", el("h2", "Deployments"), el("div", *cards, class_="cards")))

    for r in status["rollouts"]:
        if "analysis" in r:
            parts.append(_canary(r, _canary_charts(r, plane.dispatch, name)))

    serving = {d["version"]: d["name"] for d in status["deployments"] if d["version"]}
    # A version's own rollback button takes the default deployment back to it, when that
    # deployment serves something and no rollout is under way there.
    target = (
        DEFAULT_DEPLOYMENT
        if DEFAULT_DEPLOYMENT in serving.values() and DEFAULT_DEPLOYMENT not in running
        else ""
    )
    version_rows = []
    for v in versions:
        roll_back: object = ""
        if v.status == VersionStatus.READY and v.version not in serving and target:
            roll_back = action_form(
                name,
                csrf,
                "rollback",
                f"Roll {target} back to {v.version}?",
                deployment=target,
                version=v.version,
            )
        version_rows.append(
            [
                el("b", v.version),
                badge(v.status),
                serving.get(v.version, ""),
                when(v.created_at),
                when(v.built_at),
                _short(v.source_digest),
                _short(v.dependency_digest),
                el("small", v.error) if v.error else "",
                roll_back,
            ]
        )
    parts.append(
        el(
            "section",
            el("h2", "Versions"),
            table(
                [
                    "version",
                    "status",
                    "serving",
                    "uploaded",
                    "built",
                    "source",
                    "dependencies",
                    "note",
                    "",
                ],
                version_rows,
            ),
            id="versions",
        )
    )
    parts.append(
        el(
            "section",
            el("h2", "Rollouts"),
            table(
                [
                    "id",
                    "deployment",
                    "change",
                    "strategy",
                    "kind / reason",
                    "state",
                    "step",
                    "started",
                    "updated",
                ],
                [
                    [
                        el("code", r.id),
                        r.deployment,
                        f"{r.from_version or '-'} → {r.to_version}",
                        r.strategy,
                        r.reason,
                        badge(r.state),
                        r.step or "-",
                        when(r.created_at),
                        when(r.updated_at),
                    ]
                    for r in history
                ],
            ),
            id="rollouts",
        )
    )
    parts.append(
        el(
            "section",
            el("h2", "Instances"),
            table(
                ["id", "deployment", "version", "status", "sessions", "restarts", "registered"],
                [
                    [
                        el("code", i["id"]),
                        i["deployment"],
                        i["version"],
                        badge(i["status"]),
                        i["sessions"],
                        i["restarts"],
                        "yes" if i["registered"] else "no",
                    ]
                    for i in status["instances"]
                ],
            ),
            id="instances",
        )
    )
    by_version = status["sessions"]["by_version"]
    parts.append(
        el(
            "section",
            el("h2", "Sessions in the last hour"),
            table(
                ["version", "ended", "failed", "last failure"],
                [
                    [
                        v or "-",
                        s["ended"],
                        s["failed"],
                        (s["last_failure"] or {}).get("error", "") if s["last_failure"] else "",
                    ]
                    for v, s in sorted(by_version.items())
                ],
            ),
            el(
                "p", el("a", "all sessions of this agent", href=f"/dashboard/sessions?agent={name}")
            ),
            id="sessions",
        )
    )
    parts.append(
        el(
            "section",
            el("h2", "Events"),
            table(
                ["when", "kind", "message", "by"],
                [[when(e.at), e.kind, e.message, who(e.actor, e.ip)] for e in events],
            ),
            id="events",
        )
    )
    return join(parts)
