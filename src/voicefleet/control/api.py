"""`/api/v1`: the control plane's REST API (read-only views of the dispatcher for now)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request

from voicefleet.dispatch.service import DispatchService
from voicefleet.errors import AuthError
from voicefleet.protocol import tokens
from voicefleet.store.records import history

router = APIRouter(prefix="/api/v1")


def _service(request: Request) -> DispatchService:
    service: DispatchService = request.app.state.dispatch
    return service


def admin(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> DispatchService:
    """Callers sign a token with the project's key and the `roomAdmin` grant."""
    service = _service(request)
    try:
        tokens.verify(tokens.bearer(authorization), service.secret_for).require("roomAdmin")
    except AuthError as e:
        raise HTTPException(e.status, str(e)) from None
    return service


Admin = Annotated[DispatchService, Depends(admin)]


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
