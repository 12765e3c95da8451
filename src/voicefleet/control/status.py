"""`vf agent status`: an agent's deployments, instances, rollouts and routing, in one dict.

Read-only: gathered from the store, the runtime and the dispatcher's live state.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from voicefleet.control.service import ControlPlane, rollout_dict
from voicefleet.dispatch.service import InstanceView
from voicefleet.fleet import Lifecycle
from voicefleet.rollout.model import RUNNING
from voicefleet.store.models import AgentRow, DeploymentRow, InstanceRow, RolloutRow, VersionRow
from voicefleet.store.records import all_outcomes, outcomes

RETIRING = Lifecycle.RETIRING
# The autoscaler's latest decision for (agent id, deployment), if it made one.
Decisions = Callable[[str, str], dict[str, object] | None]

# "Recent sessions" in the status: those created within this many seconds.
RECENT = 3600.0


async def agent_list(
    plane: ControlPlane, agents: list[AgentRow] | None = None
) -> list[dict[str, Any]]:
    """`vf agent list`: each agent with, per deployment, the version it serves, its instances
    that are up (not stopped) and their live sessions."""
    views = plane.dispatch.instances()
    out = []
    for agent in agents if agents is not None else await plane.repo.agents():
        rows = [r for r in await plane.repo.instances(agent.id) if r.status != Lifecycle.STOPPED]
        serving: list[dict[str, Any]] = []
        for d in await plane.repo.deployments(agent.id):
            mine = [r for r in rows if r.deployment == d.name]
            serving.append(
                {
                    "deployment": d.name,
                    "version": d.version,
                    "instances": len(mine),
                    "sessions": sum((views.get(r.id) or InstanceView()).sessions for r in mine),
                }
            )
        out.append(
            {
                "id": agent.id,
                "name": agent.name,
                "grace_period": agent.grace_period,
                "created_at": agent.created_at,
                "deployments": {s["deployment"]: s["version"] for s in serving},
                "serving": serving,
                "instances": sum(s["instances"] for s in serving),
                "sessions": sum(s["sessions"] for s in serving),
            }
        )
    return out


async def agent_status(plane: ControlPlane, agent: AgentRow, decision: Decisions) -> dict[str, Any]:
    now = time.time()
    return _status(
        plane,
        agent,
        decision,
        plane.dispatch.instances(),  # one pass over the workers, not one per instance
        [
            row
            for row in await plane.repo.instances(agent.id)
            if not (row.status == Lifecycle.STOPPED and now - row.updated_at > RECENT)
        ],
        await plane.repo.rollouts(agent.id, limit=5),
        await plane.repo.deployments(agent.id),
        # Per version: how many of the last hour's sessions failed and why the newest did, so
        # a version whose sessions fail is seen where operators look first.
        await outcomes(plane.repo.engine, agent.name, now - RECENT),
    )


async def fleet_status(
    plane: ControlPlane, decision: Decisions
) -> list[tuple[AgentRow, dict[str, Any], VersionRow | None]]:
    """Every agent with its status (as `agent_status`, but with only the last rollout of each
    deployment) and its newest version: one query per table for all agents, grouped here, so
    the overview does not cost a few queries per agent."""
    repo, now = plane.repo, time.time()
    agents = await repo.agents()
    deployments = _by_agent(await repo.deployments())
    instances = _by_agent(await repo.current_instances(Lifecycle.STOPPED, now - RECENT))
    rollouts = _by_agent(await repo.last_rollouts())
    newest = {v.agent_id: v for v in await repo.newest_versions()}
    sessions = await all_outcomes(repo.engine, now - RECENT)
    views = plane.dispatch.instances()
    return [
        (
            agent,
            _status(
                plane,
                agent,
                decision,
                views,
                instances.get(agent.id, []),
                rollouts.get(agent.id, []),
                deployments.get(agent.id, []),
                sessions.get(agent.name, {}),
            ),
            newest.get(agent.id),
        )
        for agent in agents
    ]


RowT = TypeVar("RowT", InstanceRow, RolloutRow, DeploymentRow)


def _by_agent(rows: list[RowT]) -> dict[str, list[RowT]]:
    out: dict[str, list[RowT]] = {}
    for row in rows:
        out.setdefault(row.agent_id, []).append(row)
    return out


def _status(
    plane: ControlPlane,
    agent: AgentRow,
    decision: Decisions,
    views: dict[str, InstanceView],
    instance_rows: list[InstanceRow],
    rollouts: list[RolloutRow],
    deployment_rows: list[DeploymentRow],
    sessions: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    instances: list[dict[str, Any]] = []
    for row in instance_rows:
        state = plane.fleet.state(row.id)
        seen = views.get(row.id) or InstanceView()
        instances.append(
            {
                "id": row.id,
                "deployment": row.deployment,
                "version": row.version,
                "status": row.status,
                "pid": row.pid,
                "sessions": seen.sessions,
                "restarts": state.restarts if state else 0,
                "registered": seen.registered,
            }
        )
    deployments = []
    for d in deployment_rows:
        old: dict[str, dict[str, dict[str, int]]] = {Lifecycle.DRAINING: {}, RETIRING: {}}
        for i in instances:
            if i["deployment"] == d.name and i["status"] in old:
                by_version = old[i["status"]]
                entry = by_version.setdefault(i["version"], {"instances": 0, "sessions": 0})
                entry["instances"] += 1
                entry["sessions"] += i["sessions"]
        deployments.append(
            {
                "name": d.name,
                "version": d.version,
                "replicas": d.replicas,
                "autoscale": d.autoscale,
                "decision": decision(agent.id, d.name),
                "routing": plane.dispatch.weights(agent.name, d.name) or {},
                # Old versions' instances finishing their sessions (blue after a switch),
                # and replaced ones kept warm for a rollback.
                "draining": old[Lifecycle.DRAINING],
                "retiring": old[RETIRING],
            }
        )
    overflow = [
        {"routed": o.routed, "served": o.served, "sessions": o.sessions}
        for o in plane.dispatch.overflow(agent.name)
    ]
    out = [rollout_dict(r) for r in rollouts]
    for r in out:
        if r["strategy"] == "canary" and r["state"] in RUNNING:
            since = r["step_started_at"]
            canary = plane.dispatch.window(agent.name, r["to_version"], since)
            stable = plane.dispatch.window(agent.name, r["from_version"], since)
            r["analysis"] = {"canary": canary.to_dict(), "stable": stable.to_dict()}
    return {
        "agent": {"id": agent.id, "name": agent.name, "grace_period": agent.grace_period},
        "sessions": {"since_seconds": RECENT, "by_version": sessions},
        "deployments": deployments,
        "instances": instances,
        "rollouts": out,
        "overflow": overflow,
    }
