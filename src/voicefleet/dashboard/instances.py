"""Instances: every agent's running instances (status, sessions, load, restarts, health), and one
instance's page with its live log (followed as `vf agent logs --follow` follows it, with
`control.logs`)."""

from __future__ import annotations

from typing import Any

from voicefleet.control.service import ControlPlane
from voicefleet.control.status import Decisions, agent_status
from voicefleet.dashboard.html import Html, badge, el, esc, join, table, when
from voicefleet.dashboard.overview import RUNNING_INSTANCES
from voicefleet.dispatch.service import DispatchService
from voicefleet.store.models import AgentRow

TAIL_BYTES = 64 * 1024  # how much of a log the page starts with: its end, not all of it


def instance_href(agent: str, instance: str) -> str:
    return f"/dashboard/instances/{agent}/{instance}"


def _health(plane: ControlPlane, dispatch: DispatchService, i: dict[str, Any]) -> Html:
    """The runtime's word (health endpoint answered: ready), and the dispatcher's (its worker
    is connected), with the last exit of a restarted one."""
    state = plane.fleet.state(i["id"])
    view = dispatch.instance(i["id"])
    parts: list[object] = []
    if state is None:
        parts.append(el("span", "not running here", class_="muted"))
    else:
        healthy = state.status == "ready"
        parts.append(badge("healthy" if healthy else str(state.status), "ready" if healthy else ""))
    parts.append(
        " worker connected"
        if view.connected
        else (" worker registered, disconnected" if view.registered else " no worker yet")
    )
    if state is not None and state.last_exit is not None:
        parts.append(el("small", f" · last exit {state.last_exit}"))
    return join(parts)


async def _rows(
    plane: ControlPlane, dispatch: DispatchService, agent: AgentRow, decision: Decisions
) -> list[tuple[dict[str, Any], list[object]]]:
    """(the instance as `vf agent status` shows it, its row)"""
    status = await agent_status(plane, agent, decision)
    rows: list[tuple[dict[str, Any], list[object]]] = []
    for i in status["instances"]:
        view = dispatch.instance(i["id"])
        state = plane.fleet.state(i["id"])
        rows.append(
            (
                i,
                [
                    el("a", el("code", i["id"]), href=instance_href(agent.name, i["id"])),
                    el("a", agent.name, href=f"/dashboard/agents/{agent.name}"),
                    i["deployment"],
                    i["version"],
                    badge(i["status"]),
                    i["sessions"],
                    f"{view.load:.2f}" if view.connected else "-",
                    i["restarts"],
                    _health(plane, dispatch, i),
                    when(state.started_at if state else None),
                ],
            )
        )
    return rows


HEAD = ["instance", "agent", "deployment", "version", "status", "sessions", "load", "restarts",
        "health", "started"]  # fmt: skip


async def render_instances(
    plane: ControlPlane, dispatch: DispatchService, decision: Decisions
) -> Html:
    rows: list[tuple[dict[str, Any], list[object]]] = []
    for agent, _ in await plane.agents_serving():
        rows += await _rows(plane, dispatch, agent, decision)
    running = sum(1 for i, _ in rows if i["status"] in RUNNING_INSTANCES)
    note = el(
        "p",
        f"{running} running instance(s) of {len(rows)} shown (stopped ones for an hour). "
        "Open one for its live log.",
        class_="summary",
    )
    return esc(join((note, table(HEAD, (r for _, r in rows), id="instances"))))


async def render_instance(
    plane: ControlPlane,
    dispatch: DispatchService,
    agent: AgentRow,
    instance: str,
    decision: Decisions,
) -> Html:
    rows = [r for i, r in await _rows(plane, dispatch, agent, decision) if i["id"] == instance]
    if not rows:
        return el("p", f"Instance {instance} is not running (its log is below).", class_="muted")
    return table(HEAD, rows, id="instance")


def log_panel(agent: str, instance: str) -> Html:
    """Filled by the page's script from the log's own stream, as lines are written."""
    return el(
        "section",
        el("h2", "Log ", el("small", "(live; its last 64 KiB, then every line as it is written)")),
        el(
            "pre",
            "",
            id="log",
            class_="log",
            data_tail=f"/dashboard/events/instances/{agent}/{instance}/log",
            aria_live="off",
            tabindex="0",
        ),
        id="logs",
    )
