"""`vf agent status`: an agent's deployments, instances, rollouts and routing, in one dict.

Read-only: gathered from the store, the runtime and the dispatcher's live state.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from voicefleet.control.service import ControlPlane, rollout_dict
from voicefleet.dispatch.service import InstanceView
from voicefleet.fleet import Lifecycle
from voicefleet.rollout.model import RUNNING
from voicefleet.store.models import AgentRow
from voicefleet.store.records import outcomes

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
    instances: list[dict[str, Any]] = []
    views = plane.dispatch.instances()  # one pass over the workers, not one per instance
    for row in await plane.repo.instances(agent.id):
        if row.status == Lifecycle.STOPPED and time.time() - row.updated_at > 3600:
            continue
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
    rollouts = await plane.repo.rollouts(agent.id, limit=5)
    deployments = []
    for d in await plane.repo.deployments(agent.id):
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
    # Per version: how many of the last hour's sessions failed and why the newest did, so a
    # version whose sessions fail is seen where operators look first.
    sessions = await outcomes(plane.repo.engine, agent.name, time.time() - RECENT)
    return {
        "agent": {"id": agent.id, "name": agent.name, "grace_period": agent.grace_period},
        "sessions": {"since_seconds": RECENT, "by_version": sessions},
        "deployments": deployments,
        "instances": instances,
        "rollouts": out,
        "overflow": overflow,
    }
