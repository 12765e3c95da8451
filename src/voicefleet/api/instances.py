"""`/api/v1/agents/{agent}/logs`: the instances' output."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse, StreamingResponse

from voicefleet.api.deps import ERROR_RESPONSES, PREFIX, TEXT, Control
from voicefleet.control.logs import log_files, tail

router = APIRouter(prefix=PREFIX, responses=ERROR_RESPONSES)


@router.get("/agents/{agent}/logs", response_class=PlainTextResponse, responses=TEXT)
async def instance_logs(
    agent: str,
    plane: Control,
    instance: str | None = None,
    follow: bool = False,
    deployment: str | None = None,
) -> StreamingResponse:
    """Instances' stdout/stderr (one instance, or all the agent's instances in turn; those of
    one deployment with `deployment`)."""
    row = await plane.agent(agent)
    paths = log_files(plane.paths, row.id, instance)
    if deployment is not None:
        ids = {i.id for i in await plane.repo.instances(row.id) if i.deployment == deployment}
        paths = [p for p in paths if p.stem in ids]

    async def never() -> bool:
        return False

    async def stream() -> AsyncIterator[bytes]:
        for path in paths[:-1] if follow else paths:
            async for chunk in tail(path, False, never):
                yield chunk
        if follow and paths:
            async for chunk in tail(paths[-1], True, never):
                yield chunk

    return StreamingResponse(stream(), media_type="text/plain")
