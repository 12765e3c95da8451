"""`/api/v1`: the control plane's REST API, used by the `vf` CLI (OpenAPI at /docs).

Field names follow LiveKit's CloudAgent messages where they fit (agent id `CA_…`, deployment,
version, replicas). Callers sign a token with the project's key and LiveKit's agent admin grant
(`{"agent": {"admin": true}}`, as `lk agent` does for LiveKit Cloud): see control/guard.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import BaseModel, Field

from voicefleet.build.bundle import MAX_COMPRESSED_BYTES
from voicefleet.control.guard import admin_claims
from voicefleet.control.service import (
    DEFAULT_DEPLOYMENT,
    ControlPlane,
    rollout_dict,
    strategy_plan,
)
from voicefleet.control.status import agent_status
from voicefleet.dispatch.service import DispatchService
from voicefleet.errors import AuthError
from voicefleet.store.models import AgentRow, VersionRow
from voicefleet.store.records import history


class ErrorBody(BaseModel):
    detail: str


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


# What every control-API route may answer besides its success (and FastAPI's own 422).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _error("Bad request: the detail says which value and why"),
    401: _error("No token, or one that is malformed, expired or wrongly signed"),
    403: _error("The token is valid but lacks the agent admin grant of the project's key"),
    404: _error("No such agent, version, rollout, job or instance"),
    413: _error("Request body over the limit (1 MiB; bundles 50 MB)"),
    503: _error("The data dir is full or unavailable"),
}
TEXT: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/plain": {"schema": {"type": "string"}}}}
}

router = APIRouter(prefix="/api/v1", responses=ERROR_RESPONSES)


def admin(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> DispatchService:
    service: DispatchService = request.app.state.dispatch
    # AdminGuard checked the caller before the body was read; check again where it did not run
    # (an app mounted without it must not be open).
    if getattr(request.state, "claims", None) is None:
        try:
            request.state.claims = admin_claims(
                authorization, service.secret_for, service.project.api_key
            )
        except AuthError as e:
            raise HTTPException(e.status, str(e)) from None
    return service


def control(request: Request, _: Annotated[DispatchService, Depends(admin)]) -> ControlPlane:
    plane: ControlPlane = request.app.state.control
    return plane


Admin = Annotated[DispatchService, Depends(admin)]
Control = Annotated[ControlPlane, Depends(control)]


# -- dispatcher views ---------------------------------------------------------------------------


@router.get("/workers")
def list_workers(service: Admin) -> list[dict[str, Any]]:
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
        for w in service.registry.workers.values()
    ]


@router.get("/routing")
def get_routing(service: Admin) -> dict[str, dict[str, float]]:
    """Every routing entry: `agent_name/deployment` -> {version: weight}."""
    return service.routing.snapshot()


class Weights(BaseModel):
    deployment: str = ""
    # {version: weight}; null removes the entry (any worker of the agent name will do).
    weights: dict[str, float] | None


@router.put("/routing/{agent_name}", responses={409: _error("A deployed agent: rollouts route it")})
async def set_routing(agent_name: str, body: Weights, request: Request, service: Admin) -> Any:
    """Route an agent name's sessions by worker version, for workers that are not deployed by
    voicefleet but sign with version keys of their own (`vf/<agent>/<version>/<instance>`).
    Deployed agents are routed by their rollouts: use `vf agent deploy`."""
    plane: ControlPlane = request.app.state.control
    if await plane.repo.agent(agent_name) is not None:
        raise HTTPException(409, f"{agent_name} is a deployed agent: its rollouts route it")
    try:
        service.routing.set_weights(agent_name, body.weights, body.deployment)
    except ValueError as e:
        raise HTTPException(400, str(e)) from None
    return service.routing.weights(agent_name, body.deployment)


@router.get("/jobs")
async def list_jobs(
    request: Request,
    service: Admin,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    room: str | None = None,
    state: str | None = None,
) -> list[dict[str, Any]]:
    """Jobs newest first, from the store (history survives restarts)."""
    await request.app.state.recorder.flush()
    return await history(request.app.state.engine, limit=limit, room=room, state=state)


@router.get("/jobs/{job_id}")
async def get_job(request: Request, service: Admin, job_id: str) -> dict[str, Any]:
    """One job as the store has it (its state as of this request)."""
    await request.app.state.recorder.flush()
    found = await history(request.app.state.engine, limit=1, job_id=job_id)
    if not found:
        raise HTTPException(404, f"no job {job_id!r}")
    return found[0]


# -- agents -------------------------------------------------------------------------------------


class CreateAgent(BaseModel):
    name: str
    grace_period: float = Field(3600.0, ge=0)


class ConfigureAgent(BaseModel):
    grace_period: float | None = Field(None, ge=0)


class Rollback(BaseModel):
    deployment: str = DEFAULT_DEPLOYMENT
    version: str | None = None


class Scale(BaseModel):
    deployment: str = DEFAULT_DEPLOYMENT
    replicas: int | None = Field(default=None, ge=0, le=100)
    # Policy fields to set (see voicefleet.autoscale.policy.Policy); turns autoscaling on.
    autoscale: dict[str, Any] | None = None


class Promote(BaseModel):
    source: str = Field("staging", alias="from")
    target: str = Field(DEFAULT_DEPLOYMENT, alias="to")


class Secrets(BaseModel):
    secrets: dict[str, str]


def agent_dict(a: AgentRow) -> dict[str, Any]:
    return {"id": a.id, "name": a.name, "grace_period": a.grace_period, "created_at": a.created_at}


def version_dict(v: VersionRow) -> dict[str, Any]:
    return {
        "version": v.version,
        "status": v.status,
        "source_digest": v.source_digest,
        "dependency_digest": v.dependency_digest,
        "error": v.error,
        "created_at": v.created_at,
        "built_at": v.built_at,
    }


@router.post("/agents", status_code=201)
async def create_agent(body: CreateAgent, plane: Control) -> dict[str, Any]:
    return agent_dict(await plane.create_agent(body.name, body.grace_period))


@router.get("/agents")
async def list_agents(plane: Control) -> list[dict[str, Any]]:
    out = []
    for agent in await plane.repo.agents():
        deployments = await plane.repo.deployments(agent.id)
        out.append({**agent_dict(agent), "deployments": {d.name: d.version for d in deployments}})
    return out


@router.get("/agents/{agent}")
async def show_agent(agent: str, plane: Control) -> dict[str, Any]:
    return await agent_status(plane, await plane.agent(agent))


@router.patch("/agents/{agent}")
async def configure_agent(agent: str, body: ConfigureAgent, plane: Control) -> dict[str, Any]:
    row = await plane.configure(await plane.agent(agent), grace_period=body.grace_period)
    return agent_dict(row)


@router.delete("/agents/{agent}", status_code=204)
async def delete_agent(agent: str, request: Request, plane: Control) -> None:
    row = await plane.agent(agent)
    await plane.delete_agent(row)
    request.app.state.flags.forget(row.id)


# Uploads stream to disk; more at once than this are refused (429) rather than queued, so a
# burst of them cannot fill the disk or hold connections open without bound.
UPLOADS_AT_ONCE = 4


@router.post(
    "/agents/{agent}/versions",
    status_code=201,
    max_body_size=MAX_COMPRESSED_BYTES,
    responses={
        413: {"description": "Bundle over the upload limit (50 MB compressed)"},
        429: {"description": f"{UPLOADS_AT_ONCE} uploads are already in progress"},
    },
)
async def upload_version(
    agent: str,
    request: Request,
    plane: Control,
    deployment: str = DEFAULT_DEPLOYMENT,
    plan: str = "",
) -> dict[str, Any]:
    """Upload a source bundle (tar.gz body): it becomes the next version, is built, then
    rolled out to `deployment` by `plan` (JSON: {"strategy": "canary", "steps": [...], ...};
    rolling when empty). Follow the build at .../versions/{version}/log?follow=true."""
    slots: asyncio.Semaphore = request.app.state.upload_slots
    if slots.locked():
        raise HTTPException(
            429,
            f"{UPLOADS_AT_ONCE} uploads are in progress; retry when one has finished",
            headers={"Retry-After": "5"},
        )
    async with slots:
        row = await plane.agent(agent)
        rollout_plan = _plan(plan)
        uploads = plane.paths.data_dir / "uploads"
        uploads.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=uploads, suffix=".tar.gz")
        path = Path(name)
        try:
            # The body is capped as it streams (max_body_size: a 413 past the limit).
            with os.fdopen(fd, "wb") as out:
                async for chunk in request.stream():
                    out.write(chunk)
            version = await plane.upload(row, path, deployment, rollout_plan)
        finally:
            path.unlink(missing_ok=True)
    return version_dict(version)


@router.get("/agents/{agent}/versions")
async def list_versions(agent: str, plane: Control) -> list[dict[str, Any]]:
    row = await plane.agent(agent)
    serving = {d.version: d.name for d in await plane.repo.deployments(row.id)}
    return [
        {**version_dict(v), "deployment": serving.get(v.version, "")}
        for v in await plane.versions(row)
    ]


@router.get(
    "/agents/{agent}/versions/{version}/log", response_class=PlainTextResponse, responses=TEXT
)
async def build_log(
    agent: str, version: str, plane: Control, follow: bool = False
) -> StreamingResponse:
    row = await plane.agent(agent)
    await plane.version(row, version)
    path = plane.paths.build_log(row.id, version)

    async def done() -> bool:
        v = await plane.version(row, version)
        return v.status != "building"

    return StreamingResponse(_tail(path, follow, done), media_type="text/plain")


@router.post("/agents/{agent}/rollback", status_code=202)
async def rollback(agent: str, body: Rollback, plane: Control) -> dict[str, Any]:
    rollout = await plane.rollback(await plane.agent(agent), body.deployment, body.version)
    return rollout_dict(rollout)


@router.post("/agents/{agent}/restart", status_code=202)
async def restart(
    agent: str, plane: Control, deployment: str = DEFAULT_DEPLOYMENT
) -> dict[str, Any]:
    return rollout_dict(await plane.restart(await plane.agent(agent), deployment))


@router.post("/agents/{agent}/promote", status_code=202)
async def promote(agent: str, body: Promote, plane: Control) -> dict[str, Any]:
    row = await plane.agent(agent)
    source = await plane.deployment(row, body.source)
    if not source.version:
        raise HTTPException(400, f"deployment {body.source} serves no version to promote")
    return rollout_dict(await plane.roll_to(row, body.target, source.version, kind="promote"))


@router.post("/agents/{agent}/scale")
async def scale(agent: str, body: Scale, plane: Control) -> dict[str, Any]:
    """A fixed number of instances (`replicas`: autoscaling off), or an autoscaling policy."""
    dep = await plane.scale(
        await plane.agent(agent), body.deployment, body.replicas, body.autoscale
    )
    return {
        "deployment": dep.name,
        "version": dep.version,
        "replicas": dep.replicas,
        "autoscale": dep.autoscale,
    }


def _plan(text: str) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        plan = json.loads(text)
    except ValueError as e:
        raise HTTPException(400, f"plan is not JSON: {e}") from None
    if not isinstance(plan, dict):
        raise HTTPException(400, "plan must be a JSON object")
    return strategy_plan(plan)


class Deploy(BaseModel):
    version: str
    deployment: str = DEFAULT_DEPLOYMENT
    plan: dict[str, Any] = Field(default_factory=dict)


@router.post("/agents/{agent}/rollouts", status_code=202)
async def deploy_version(agent: str, body: Deploy, plane: Control) -> dict[str, Any]:
    """Roll an existing (built) version out again, with any strategy. No rebuild."""
    row = await plane.agent(agent)
    return rollout_dict(await plane.roll_to(row, body.deployment, body.version, plan=body.plan))


@router.post("/agents/{agent}/canary/{command}", status_code=202)
async def canary_command(
    agent: str, command: str, plane: Control, deployment: str = DEFAULT_DEPLOYMENT
) -> dict[str, Any]:
    """pause, resume, promote or abort the canary running on `deployment`."""
    rollout = await plane.rollout_command(await plane.agent(agent), deployment, command)
    return rollout_dict(rollout)


@router.get("/agents/{agent}/rollouts/{rollout_id}")
async def get_rollout(agent: str, rollout_id: str, plane: Control) -> dict[str, Any]:
    row = await plane.agent(agent)
    rollout = await plane.repo.rollout(rollout_id)
    if rollout is None or rollout.agent_id != row.id:
        raise HTTPException(404, f"no rollout '{rollout_id}' for agent {row.name}")
    return rollout_dict(rollout)


@router.get("/agents/{agent}/rollouts")
async def list_rollouts(
    agent: str, plane: Control, version: str | None = None
) -> list[dict[str, Any]]:
    row = await plane.agent(agent)
    rollouts = await plane.repo.rollouts(row.id)
    return [rollout_dict(r) for r in rollouts if version is None or r.to_version == version]


@router.get("/agents/{agent}/events")
async def events(agent: str, plane: Control, limit: int = 100) -> list[dict[str, Any]]:
    row = await plane.agent(agent)
    return [
        {"kind": e.kind, "message": e.message, "actor": e.actor, "at": e.at}
        for e in await plane.repo.events(row.id, limit)
    ]


@router.get("/agents/{agent}/logs", response_class=PlainTextResponse, responses=TEXT)
async def instance_logs(
    agent: str, plane: Control, instance: str | None = None, follow: bool = False
) -> StreamingResponse:
    """Instances' stdout/stderr (one instance, or all the agent's instances in turn)."""
    row = await plane.agent(agent)
    folder = plane.paths.instance_logs(row.id)
    if instance is not None:
        paths = [folder / f"{instance}.log"]
        # An instance id, not a path: "../../x" must not read another file.
        if paths[0].parent != folder or not paths[0].exists():
            raise HTTPException(404, f"no logs for instance '{instance}'")
    else:
        paths = sorted(folder.glob("*.log"), key=lambda p: p.stat().st_mtime)

    async def never() -> bool:
        return False

    async def stream() -> AsyncIterator[bytes]:
        for path in paths[:-1] if follow else paths:
            async for chunk in _tail(path, False, never):
                yield chunk
        if follow and paths:
            async for chunk in _tail(paths[-1], True, never):
                yield chunk

    return StreamingResponse(stream(), media_type="text/plain")


@router.get("/agents/{agent}/secrets")
async def list_secrets(agent: str, plane: Control) -> list[dict[str, Any]]:
    return await plane.secret_names(await plane.agent(agent))


@router.put("/agents/{agent}/secrets")
async def set_secrets(agent: str, body: Secrets, plane: Control) -> dict[str, Any]:
    names = await plane.set_secrets(await plane.agent(agent), body.secrets)
    return {"set": names}


@router.delete("/agents/{agent}/secrets")
async def unset_secrets(
    agent: str, plane: Control, name: Annotated[list[str], Query()]
) -> dict[str, Any]:
    return {"removed": await plane.unset_secrets(await plane.agent(agent), name)}


async def _tail(path: Path, follow: bool, finished: Any) -> AsyncIterator[bytes]:
    """A file's content, then (following) what is appended until `finished()` says so."""
    offset = 0
    while True:
        if path.exists():
            if path.stat().st_size < offset:
                offset = 0  # rotated (copy-truncate): start over on the new content
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            if chunk:
                offset += len(chunk)
                yield chunk
                continue
        if not follow or await finished():
            if path.exists() and path.stat().st_size > offset:
                continue  # the last lines arrived with the end
            return
        await asyncio.sleep(0.2)
