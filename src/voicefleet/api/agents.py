"""`/api/v1/agents`: create, list, show, configure, scale and delete agents; their secrets and
event log. Field names follow LiveKit's CloudAgent messages where they fit (agent id `CA_…`,
deployment, version, replicas)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import Base64Bytes, BaseModel, Field

from voicefleet.api.deps import (
    ERROR_RESPONSES,
    PREFIX,
    Autoscale,
    Caller,
    Control,
    Flags,
    KeyStore,
    Who,
)
from voicefleet.api.events import event_dict
from voicefleet.control.service import DEFAULT_DEPLOYMENT
from voicefleet.control.status import agent_list, agent_status
from voicefleet.store.models import AgentRow

router = APIRouter(prefix=PREFIX, responses=ERROR_RESPONSES)


class CreateAgent(BaseModel):
    name: str
    grace_period: float = Field(3600.0, ge=0)


class ConfigureAgent(BaseModel):
    grace_period: float | None = Field(None, ge=0)


class Scale(BaseModel):
    deployment: str = DEFAULT_DEPLOYMENT
    replicas: int | None = Field(default=None, ge=0, le=100)
    # Policy fields to set (see voicefleet.autoscale.policy.Policy); turns autoscaling on.
    autoscale: dict[str, Any] | None = None


class Secrets(BaseModel):
    """Environment variables by name; `files`: file secrets by file name, base64-encoded;
    `overwrite`: these become the whole set (the others are removed), else they are merged."""

    secrets: dict[str, str] = Field(default_factory=dict)
    files: dict[str, Base64Bytes] = Field(default_factory=dict)
    overwrite: bool = False


def agent_dict(a: AgentRow) -> dict[str, Any]:
    return {"id": a.id, "name": a.name, "grace_period": a.grace_period, "created_at": a.created_at}


@router.post("/agents", status_code=201)
async def create_agent(body: CreateAgent, plane: Control, who: Who) -> dict[str, Any]:
    return agent_dict(await plane.create_agent(body.name, body.grace_period, who))


@router.get("/agents")
async def list_agents(
    plane: Control,
    caller: Caller,
    agent_id: Annotated[list[str] | None, Query(alias="id")] = None,
) -> list[dict[str, Any]]:
    """Every agent (or those named by `id`, ids or names, repeatable): the version each
    deployment serves (`deployments`), and per deployment its instances and live sessions. A
    key limited to one agent sees that one only."""
    rows = [await plane.agent(a) for a in agent_id] if agent_id else await plane.repo.agents()
    return await agent_list(plane, [row for row in rows if caller.covers(row.id)])


@router.get("/agents/{agent}")
async def show_agent(agent: str, plane: Control, autoscaler: Autoscale) -> dict[str, Any]:
    return await agent_status(plane, await plane.agent(agent), autoscaler.decision)


@router.patch("/agents/{agent}")
async def configure_agent(
    agent: str, body: ConfigureAgent, plane: Control, who: Who
) -> dict[str, Any]:
    row = await plane.configure(await plane.agent(agent), grace_period=body.grace_period, actor=who)
    return agent_dict(row)


@router.delete("/agents/{agent}", status_code=204)
async def delete_agent(agent: str, plane: Control, flags: Flags, who: Who) -> None:
    row = await plane.agent(agent)
    await plane.delete_agent(row, who)
    flags.forget(row.id)


@router.post("/agents/{agent}/scale")
async def scale(agent: str, body: Scale, plane: Control, who: Who) -> dict[str, Any]:
    """A fixed number of instances (`replicas`: autoscaling off), or an autoscaling policy."""
    dep = await plane.scale(
        await plane.agent(agent), body.deployment, body.replicas, body.autoscale, who
    )
    return {
        "deployment": dep.name,
        "version": dep.version,
        "replicas": dep.replicas,
        "autoscale": dep.autoscale,
    }


@router.get("/agents/{agent}/events")
async def events(
    agent: str, plane: Control, keys: KeyStore, limit: int = 100
) -> list[dict[str, Any]]:
    """Newest first, as GET /api/v1/events?agent= gives them (without paging)."""
    row = await plane.agent(agent)
    key_names = {k.id: k.name for k in await keys.list()}
    return [event_dict(e, {row.id: row.name}, key_names) for e in await plane.events(row, limit)]


@router.get("/agents/{agent}/secrets")
async def list_secrets(agent: str, plane: Control) -> list[dict[str, Any]]:
    return await plane.secret_names(await plane.agent(agent))


# File secrets are up to 1 MiB each (base64 in the body): a request may carry several.
MAX_SECRETS_BODY = 16 << 20


@router.put(
    "/agents/{agent}/secrets",
    max_body_size=MAX_SECRETS_BODY,
    responses={413: {"description": "Secrets over 16 MiB in one request"}},
)
async def set_secrets(agent: str, body: Secrets, plane: Control, who: Who) -> dict[str, Any]:
    names = await plane.set_secrets(
        await plane.agent(agent), body.secrets, who, files=body.files, overwrite=body.overwrite
    )
    return {"set": names}


@router.delete("/agents/{agent}/secrets")
async def unset_secrets(
    agent: str, plane: Control, who: Who, name: Annotated[list[str], Query()]
) -> dict[str, Any]:
    return {"removed": await plane.unset_secrets(await plane.agent(agent), name, who)}
