"""The overview (`/`): every agent and deployment at a glance, problems first.

`problems` is a plain function over what `control.status.agent_status` returns and the agent's
versions, so the agent page shows the same ones."""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Any

from voicefleet.control.service import ControlPlane
from voicefleet.control.status import Decisions, fleet_status
from voicefleet.dashboard.changes import Changes
from voicefleet.dashboard.html import Html, badge, el, esc, join, table, when
from voicefleet.dispatch.service import DispatchService
from voicefleet.fleet import Lifecycle
from voicefleet.rollout.model import RolloutState
from voicefleet.store.models import VersionRow, VersionStatus
from voicefleet.store.records import Recorder

# Instances that are still running (a stopped one that restarted is history).
RUNNING_INSTANCES = {Lifecycle.STARTING, Lifecycle.READY, Lifecycle.RETIRING, Lifecycle.DRAINING}


@dataclass(frozen=True)
class Problem:
    agent: str
    text: str


def problems(status: dict[str, Any], versions: list[VersionRow]) -> list[Problem]:
    """What an operator should look at first: a failed build of the newest version, a
    deployment whose last rollout was aborted, a failed or crash-looping instance, sessions
    that failed in the last hour."""
    name = status["agent"]["name"]
    found: list[Problem] = []
    if versions:
        newest = max(versions, key=lambda v: v.number)
        if newest.status == VersionStatus.FAILED:
            found.append(Problem(name, f"build of {newest.version} failed: {newest.error}"))
    seen: set[str] = set()
    for r in status["rollouts"]:  # newest first: the first of each deployment is its last
        if r["deployment"] in seen:
            continue
        seen.add(r["deployment"])
        if r["state"] == RolloutState.ABORTED:
            found.append(
                Problem(
                    name,
                    f"{r['strategy']} rollout of {r['to_version']} to {r['deployment']} "
                    f"aborted: {r['reason']}",
                )
            )
    for i in status["instances"]:
        if i["status"] == Lifecycle.FAILED:
            found.append(Problem(name, f"instance {i['id']} ({i['version']}) failed"))
        elif i["restarts"] and i["status"] in RUNNING_INSTANCES:
            found.append(
                Problem(name, f"instance {i['id']} ({i['version']}) restarted {i['restarts']}x")
            )
    for version, seen_sessions in sorted(status["sessions"]["by_version"].items()):
        if seen_sessions["failed"]:
            last = seen_sessions["last_failure"] or {}
            found.append(
                Problem(
                    name,
                    f"{version or 'unversioned'}: {seen_sessions['failed']}/"
                    f"{seen_sessions['ended']} sessions failed in the last hour"
                    + (f" (last: {last.get('error') or 'no reason given'})" if last else ""),
                )
            )
    return found


def split_bar(weights: dict[str, float]) -> Html:
    """The traffic split as a bar (widths set by the script from data-w: the page's CSP allows
    no inline styles) with the same numbers as text."""
    total = sum(weights.values())
    if not weights or total <= 0:
        return el("span", "no traffic routed", class_="muted")
    ordered = sorted(weights.items())
    segments = [
        el(
            "span",
            class_=f"seg c{n % 4}",
            data_w=f"{100 * w / total:.2f}",
            title=f"{version}: {100 * w / total:.1f}%",
        )
        for n, (version, w) in enumerate(ordered)
        if w > 0
    ]
    legend = join((f"{v} {100 * w / total:.0f}%" for v, w in ordered), " · ")
    return el(
        "div",
        el("div", *segments, class_="bar", aria_hidden="true"),
        el("small", legend),
        class_="split",
    )


def instance_counts(instances: list[dict[str, Any]], deployment: str) -> Html:
    counts = Counter(
        i["status"]
        for i in instances
        if i["deployment"] == deployment and i["status"] != Lifecycle.STOPPED
    )
    if not counts:
        return el("span", "none", class_="muted")
    return join((badge(f"{n} {s}", s) for s, n in sorted(counts.items())), " ")


def rollout_cell(rollouts: list[dict[str, Any]], deployment: str) -> Html:
    for r in rollouts:
        if r["deployment"] == deployment:
            change = f"{r['from_version'] or '-'} → {r['to_version']}"
            return join(
                (
                    badge(r["state"]),
                    " ",
                    change,
                    " ",
                    el("small", r["strategy"]),
                    " ",
                    el("small", when(r["updated_at"])),
                ),
            )
    return el("span", "none", class_="muted")


# Every open overview stream looks at the page each second (web.TICK). A render reads every
# agent's status in a few queries (`fleet_status`); it happens only when something the page
# shows changed (`Changes`), at most once per SHARED_FOR seconds, and at least every REFRESH
# seconds (the last hour's window moves on without an event). One render serves every page
# and stream that asks (and those that ask while it runs), so K open overviews cost what one
# does.
SHARED_FOR = 0.9
REFRESH = 10.0


@dataclass
class _Shared:
    done_at: float = 0.0
    stamp: object = None
    html: Html | None = None
    running: asyncio.Task[Html] | None = None


_shared: weakref.WeakKeyDictionary[DispatchService, _Shared] = weakref.WeakKeyDictionary()


async def render_overview(
    plane: ControlPlane,
    dispatch: DispatchService,
    decision: Decisions,
    recorder: Recorder,
    changes: Changes,
) -> Html:
    shared = _shared.setdefault(dispatch, _Shared())
    age = time.monotonic() - shared.done_at
    stamp = changes.stamp(dispatch)
    if shared.html is not None and (age < SHARED_FOR or (stamp == shared.stamp and age < REFRESH)):
        return shared.html
    if shared.running is None:
        # The stamp as the render begins: what changes while it reads is rendered next time.
        shared.running = asyncio.create_task(_render(plane, dispatch, decision, recorder))
        shared.running.add_done_callback(lambda _: _finished(shared, stamp))
    # Shielded: a page that goes away while the render runs does not cancel it for the others.
    return await asyncio.shield(shared.running)


def _finished(shared: _Shared, stamp: object) -> None:
    task, shared.running = shared.running, None
    if task is not None and not task.cancelled() and task.exception() is None:
        shared.html, shared.done_at, shared.stamp = task.result(), time.monotonic(), stamp


async def _render(
    plane: ControlPlane, dispatch: DispatchService, decision: Decisions, recorder: Recorder
) -> Html:
    queued = dispatch.queued_by_agent()
    found: list[Problem] = []
    rows: list[tuple[bool, str, list[object]]] = []
    known: set[str] = set()
    total_sessions = 0
    await recorder.flush()  # the sessions that ended are in the store's last hour
    for agent, status, newest in await fleet_status(plane, decision):
        known.add(agent.id)
        mine = problems(status, [newest] if newest else [])
        found += mine
        link = el("a", agent.name, href=f"/dashboard/agents/{agent.name}")
        for n, d in enumerate(status["deployments"]):
            sessions = sum(
                i["sessions"] for i in status["instances"] if i["deployment"] == d["name"]
            )
            total_sessions += sessions
            cells: list[object] = [
                link if n == 0 else "",
                d["name"],
                d["version"] or el("span", "nothing yet", class_="muted"),
                split_bar(d["routing"]),
                instance_counts(status["instances"], d["name"]),
                sessions,
                queued.get(agent.name, 0) if n == 0 else "",
                rollout_cell(status["rollouts"], d["name"]),
            ]
            rows.append((bool(mine), agent.name, cells))
    # Problems first, then by name; an agent's deployments stay together.
    rows.sort(key=lambda r: (not r[0], r[1]))
    others = Counter(w.key.agent_name for w in dispatch.workers() if w.identity.agent not in known)
    summary = el(
        "p",
        join(
            (
                f"{len(known)} agent(s)",
                f"{len(dispatch.workers())} worker(s) connected",
                f"{total_sessions} live session(s)",
                f"{sum(queued.values())} queued job(s)",
            ),
            " · ",
        ),
        class_="summary",
    )
    head = ["agent", "deployment", "serving", "traffic", "instances", "sessions", "queued",
            "last rollout"]  # fmt: skip
    parts = [summary]
    if found:
        parts.append(
            el(
                "section",
                el("h2", f"Problems ({len(found)})"),
                el("ul", *(el("li", el("b", p.agent), ": ", p.text) for p in found)),
                class_="problems",
                id="problems",
            )
        )
    parts.append(el("section", el("h2", "Agents"), table(head, (r[2] for r in rows)), id="agents"))
    if others:
        parts.append(
            el(
                "section",
                el("h2", "Other workers"),
                el(
                    "p",
                    "Workers registered under agent names voicefleet does not deploy.",
                    class_="muted",
                ),
                table(["agent name", "workers"], sorted(others.items())),
                id="others",
            )
        )
    return esc(join(parts))
