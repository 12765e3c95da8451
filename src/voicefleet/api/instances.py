"""`/api/v1/agents/{agent}/logs`: the instances' output."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, HTTPException
from fastapi.responses import PlainTextResponse, StreamingResponse

from voicefleet.api.deps import ERROR_RESPONSES, PREFIX, TEXT, Control, tail

router = APIRouter(prefix=PREFIX, responses=ERROR_RESPONSES)


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
            async for chunk in tail(path, False, never):
                yield chunk
        if follow and paths:
            async for chunk in tail(paths[-1], True, never):
                yield chunk

    return StreamingResponse(stream(), media_type="text/plain")
