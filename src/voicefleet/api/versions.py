"""`/api/v1/agents/{agent}/versions`: upload a source bundle (a new version, built, then rolled
out), list versions, follow a build's log."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import BaseModel, Field

from voicefleet.api.deps import ERROR_RESPONSES, PREFIX, TEXT, Control, Who
from voicefleet.build.bundle import MAX_COMPRESSED_BYTES
from voicefleet.control.logs import tail
from voicefleet.control.service import DEFAULT_DEPLOYMENT
from voicefleet.rollout.plans import Plan, parse_plan
from voicefleet.store.models import VersionRow, VersionStatus

router = APIRouter(prefix=PREFIX, responses=ERROR_RESPONSES)

# Uploads stream to disk; more at once than this are refused (429) rather than queued, so a
# burst of them cannot fill the disk or hold connections open without bound.
UPLOADS_AT_ONCE = 4


def version_dict(v: VersionRow) -> dict[str, Any]:
    return {
        "version": v.version,
        "status": v.status,
        "source_digest": v.source_digest,
        "dependency_digest": v.dependency_digest,
        "image": v.image,
        "image_digest": v.image_digest,
        "error": v.error,
        "created_at": v.created_at,
        "built_at": v.built_at,
    }


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
    who: Who,
    deployment: str = DEFAULT_DEPLOYMENT,
    plan: str = "",
) -> dict[str, Any]:
    """Upload a source bundle (tar.gz body): it becomes the next version, is built, then
    rolled out to `deployment` by `plan` (JSON: {"strategy": "canary", "steps": [...], ...};
    rolling when empty). Follow the build at .../versions/{version}/log?follow=true, then the
    rollout at .../rollouts/{rollout} (it exists once the version is built)."""
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
        uploads = plane.paths.uploads
        uploads.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=uploads, suffix=".tar.gz")
        path = Path(name)
        try:
            # The body is capped as it streams (max_body_size: a 413 past the limit).
            with os.fdopen(fd, "wb") as out:
                async for chunk in request.stream():
                    out.write(chunk)
            version, rollout_id = await plane.upload(row, path, deployment, rollout_plan, who)
        finally:
            path.unlink(missing_ok=True)
    return {**version_dict(version), "rollout": rollout_id}


class ImageDeploy(BaseModel):
    image: str = Field(description="The image's reference, e.g. registry/agent@sha256:…")
    deployment: str = DEFAULT_DEPLOYMENT
    plan: dict[str, Any] | None = None


@router.post("/agents/{agent}/images", status_code=201)
async def deploy_image(agent: str, body: ImageDeploy, plane: Control, who: Who) -> dict[str, Any]:
    """Deploy a prebuilt container image (the Kubernetes runtime): a new version, ready at
    once (no build), rolled out to `deployment` by `plan` (as an upload's). Follow the rollout
    at .../rollouts/{rollout}."""
    row = await plane.agent(agent)
    plan = parse_plan(body.plan) if body.plan else None
    version, rollout_id = await plane.deploy_image(row, body.image, body.deployment, plan, who)
    return {**version_dict(version), "rollout": rollout_id}


def _plan(text: str) -> Plan | None:
    if not text:
        return None
    try:
        plan = json.loads(text)
    except ValueError as e:
        raise HTTPException(400, f"plan is not JSON: {e}") from None
    if not isinstance(plan, dict):
        raise HTTPException(400, "plan must be a JSON object")
    return parse_plan(plan)


@router.get("/agents/{agent}/versions")
async def list_versions(agent: str, plane: Control) -> list[dict[str, Any]]:
    row = await plane.agent(agent)
    serving = {d.version: d.name for d in await plane.deployments(row)}
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
        return v.status != VersionStatus.BUILDING

    return StreamingResponse(tail(path, follow, done), media_type="text/plain")
