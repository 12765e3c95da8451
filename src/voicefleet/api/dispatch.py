"""`/api/v1/workers`, `/routing`, `/jobs`: what the dispatcher sees, and the jobs' history."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel

from voicefleet.api.deps import ERROR_RESPONSES, PREFIX, Control, Dispatch, Jobs, Who, error

router = APIRouter(prefix=PREFIX, responses=ERROR_RESPONSES)


@router.get("/workers")
def list_workers(service: Dispatch) -> list[dict[str, Any]]:
    return [
        {
            "id": w.id,
            "agent_name": w.key.agent_name,
            "namespace": w.key.namespace,
            "status": str(w.status),
            "load": round(w.load, 3),
            "job_count": w.job_count,
            "jobs": sorted(w.jobs),
            "pool": w.pool,
            "agent_id": w.identity.agent,
            "instance": w.identity.instance,
            "deployment": w.deployment,
            "sdk_version": w.sdk_version,
            "registered_at": w.registered_at,
        }
        for w in service.workers()
    ]


@router.get("/routing")
def get_routing(service: Dispatch) -> dict[str, dict[str, float]]:
    """Every routing entry: `agent_name/deployment` -> {version: weight}."""
    return service.routes()


class Weights(BaseModel):
    deployment: str = ""
    # {version: weight}; null removes the entry (any worker of the agent name will do).
    weights: dict[str, float] | None


@router.put("/routing/{agent_name}", responses={409: error("A deployed agent: rollouts route it")})
async def set_routing(
    agent_name: str, body: Weights, plane: Control, who: Who
) -> dict[str, float] | None:
    """Route an agent name's sessions by worker version, for workers that are not deployed by
    voicefleet but sign with version keys of their own (`vf/<agent>/<version>/<instance>`).
    Deployed agents are routed by their rollouts: use `vf agent deploy`."""
    return await plane.set_routing(agent_name, body.weights, body.deployment, who)


@router.get("/jobs")
async def list_jobs(
    jobs: Jobs,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    room: str | None = None,
    state: str | None = None,
) -> list[dict[str, Any]]:
    """Jobs newest first, from the store (history survives restarts)."""
    return await jobs.history(limit=limit, room=room, state=state)


@router.get("/jobs/{job_id}")
async def get_job(jobs: Jobs, job_id: str) -> dict[str, Any]:
    """One job as the store has it (its state as of this request)."""
    found = await jobs.history(limit=1, job_id=job_id)
    if not found:
        raise HTTPException(404, f"no job {job_id!r}")
    return found[0]
