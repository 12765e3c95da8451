"""`vf agent status`: an agent's deployments, instances, rollouts and routing, in one dict.

Read-only: gathered from the store, the runtime and the dispatcher's live state.
"""

from __future__ import annotations

import time
from typing import Any

from voicefleet.control.instances import RETIRING
from voicefleet.control.service import ControlPlane, rollout_dict
from voicefleet.rollout.canary import PAUSED
from voicefleet.rollout.rolling import PROGRESSING
from voicefleet.store.models import AgentRow
from voicefleet.store.records import outcomes

# "Recent sessions" in the status: those created within this many seconds.
RECENT = 3600.0


async def agent_status(plane: ControlPlane, agent: AgentRow) -> dict[str, Any]:
    instances: list[dict[str, Any]] = []
    for row in await plane.repo.instances(agent.id):
        if row.status == "stopped" and time.time() - row.updated_at > 3600:
            continue
        state = plane.instances.runtime.get(row.id)
        instances.append(
            {
                "id": row.id,
                "deployment": row.deployment,
                "version": row.version,
                "status": row.status,
                "pid": row.pid,
                "sessions": plane.instances.sessions(row.id),
                "restarts": state.restarts if state else 0,
                "registered": plane.instances.registered(row.id),
            }
        )
    rollouts = await plane.repo.rollouts(agent.id, limit=5)
    deployments = []
    for d in await plane.repo.deployments(agent.id):
        old: dict[str, dict[str, dict[str, int]]] = {"draining": {}, RETIRING: {}}
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
                "decision": plane.autoscaler.decision(agent.id, d.name),
                "routing": plane.dispatch.routing.weights(agent.name, d.name) or {},
                # Old versions' instances finishing their sessions (blue after a switch),
                # and replaced ones kept warm for a rollback.
                "draining": old["draining"],
                "retiring": old[RETIRING],
            }
        )
    overflow = [
        {"routed": routed, "served": served, "sessions": n}
        for (name, routed, served), n in plane.dispatch.scheduler.overflow.items()
        if name == agent.name
    ]
    out = [rollout_dict(r) for r in rollouts]
    for r in out:
        if r["strategy"] == "canary" and r["state"] in (PROGRESSING, PAUSED):
            canary, stable = await plane.windows(
                agent.id, r["to_version"], r["from_version"], r["step_started_at"]
            )
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
