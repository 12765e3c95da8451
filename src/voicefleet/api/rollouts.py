"""`/api/v1/agents/{agent}/rollouts` and the commands that start one: deploy a built version,
roll back, restart, promote between deployments; canary commands; read rollouts."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from voicefleet.api.deps import ERROR_RESPONSES, PREFIX, Control, Who
from voicefleet.control.service import DEFAULT_DEPLOYMENT, rollout_dict
from voicefleet.rollout.plans import parse_plan

router = APIRouter(prefix=PREFIX, responses=ERROR_RESPONSES)


class Rollback(BaseModel):
    deployment: str = DEFAULT_DEPLOYMENT
    version: str | None = None


class Promote(BaseModel):
    source: str = Field("staging", alias="from")
    target: str = Field(DEFAULT_DEPLOYMENT, alias="to")


class Deploy(BaseModel):
    version: str
    deployment: str = DEFAULT_DEPLOYMENT
    plan: dict[str, Any] = Field(default_factory=dict)


@router.post("/agents/{agent}/rollback", status_code=202)
async def rollback(agent: str, body: Rollback, plane: Control, who: Who) -> dict[str, Any]:
    rollout = await plane.rollback(await plane.agent(agent), body.deployment, body.version, who)
    return rollout_dict(rollout)


@router.post("/agents/{agent}/restart", status_code=202)
async def restart(
    agent: str, plane: Control, who: Who, deployment: str = DEFAULT_DEPLOYMENT
) -> dict[str, Any]:
    return rollout_dict(await plane.restart(await plane.agent(agent), deployment, who))


@router.post("/agents/{agent}/promote", status_code=202)
async def promote(agent: str, body: Promote, plane: Control, who: Who) -> dict[str, Any]:
    rollout = await plane.promote(await plane.agent(agent), body.source, body.target, who)
    return rollout_dict(rollout)


@router.post("/agents/{agent}/rollouts", status_code=202)
async def deploy_version(agent: str, body: Deploy, plane: Control, who: Who) -> dict[str, Any]:
    """Roll an existing (built) version out again, with any strategy. No rebuild."""
    row = await plane.agent(agent)
    plan = parse_plan(body.plan)
    rollout = await plane.roll_to(row, body.deployment, body.version, plan=plan, actor=who)
    return rollout_dict(rollout)


@router.post("/agents/{agent}/canary/{command}", status_code=202)
async def canary_command(
    agent: str, command: str, plane: Control, who: Who, deployment: str = DEFAULT_DEPLOYMENT
) -> dict[str, Any]:
    """pause, resume, promote or abort the canary running on `deployment`."""
    rollout = await plane.rollout_command(await plane.agent(agent), deployment, command, who)
    return rollout_dict(rollout)


@router.get("/agents/{agent}/rollouts/{rollout_id}")
async def get_rollout(agent: str, rollout_id: str, plane: Control) -> dict[str, Any]:
    row = await plane.agent(agent)
    rollout = await plane.rollout(row, rollout_id)
    if rollout is None:
        raise HTTPException(404, f"no rollout '{rollout_id}' for agent {row.name}")
    return rollout_dict(rollout)


@router.get("/agents/{agent}/rollouts")
async def list_rollouts(
    agent: str, plane: Control, version: str | None = None
) -> list[dict[str, Any]]:
    rollouts = await plane.rollouts(await plane.agent(agent))
    return [rollout_dict(r) for r in rollouts if version is None or r.to_version == version]
