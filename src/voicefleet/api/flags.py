"""`/api/v1/agents/{agent}/flags`: set, read, kill and stream an agent's feature flags.

Changes take the project's key (as the rest of the control API); the stream also takes the key
of one of the agent's own instances, which is what `voicefleet.sdk.flags` signs with.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Request
from fastapi.responses import StreamingResponse

from voicefleet.api.deps import ERROR_RESPONSES, PREFIX, Control, Flags, Who, dispatch_service
from voicefleet.control.access import Keys
from voicefleet.control.service import ControlPlane
from voicefleet.errors import AuthError
from voicefleet.protocol import tokens
from voicefleet.sdk.evaluate import Session

router = APIRouter(prefix=PREFIX, responses=ERROR_RESPONSES)
KEEPALIVE = 15.0


@router.get("/agents/{agent}/flags")
async def list_flags(agent: str, plane: Control, flags: Flags) -> list[dict[str, Any]]:
    return flags.list((await plane.agent(agent)).id)


@router.get(
    "/agents/{agent}/flags/stream",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}},
)
async def stream_flags(
    agent: str,
    request: Request,
    flags: Flags,
    authorization: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    """Server-sent events: `snapshot` (all the agent's flags) at once and after every change,
    a keepalive comment every 15 s. For the agent's own instances, a voicefleet API key (any
    role) that may read this agent, or the project's key with the agent admin grant."""
    plane: ControlPlane = request.app.state.control
    service = dispatch_service(request)
    instance: tokens.WorkerIdentity | None = None  # the caller, when an instance's key
    try:  # before the agent is looked up: no telling strangers which agents exist
        token = tokens.bearer(authorization)
        if tokens.is_key_token(token):  # a voicefleet API key: any role reads
            keys: Keys = request.app.state.keys
            (await keys.authenticate(token)).require_agent(agent)
        else:
            claims = tokens.verify(token, service.secret_for)
            if claims.api_key == service.project.api_key:
                # The project's key also signs the room tokens handed to end users' browsers.
                claims.require_admin()
            else:
                instance = tokens.instance_identity(claims.api_key) or tokens.UNMANAGED
    except AuthError as e:
        raise HTTPException(e.status, str(e)) from None
    row = await plane.agent(agent)
    if instance is not None and instance.agent != row.id:
        raise HTTPException(403, f"this key may not read the flags of {row.name}")

    async def events() -> AsyncIterator[bytes]:
        seen = -1
        waited = 0.0
        while not service.closing and not await request.is_disconnected():
            if flags.version(row.id) != seen:
                seen = flags.version(row.id)
                data = json.dumps(flags.snapshot(row.id))
                yield f"event: snapshot\ndata: {data}\n\n".encode()
                waited = 0.0
            # Wake each second to notice a shutdown; a change wakes at once.
            if not await flags.wait_change(row.id, seen, 1.0):
                waited += 1.0
                if waited >= KEEPALIVE:
                    yield b": keepalive\n\n"
                    waited = 0.0

    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


@router.get("/agents/{agent}/flags/{key}")
async def get_flag(agent: str, key: str, plane: Control, flags: Flags) -> dict[str, Any]:
    return flags.get((await plane.agent(agent)).id, key)


@router.put("/agents/{agent}/flags/{key}")
async def set_flag(
    agent: str,
    key: str,
    body: dict[str, Any],
    plane: Control,
    flags: Flags,
    who: Who,
) -> dict[str, Any]:
    """Create or replace a flag: {"type", "value", "rules": [...], "off"} (see docs/flags.md)."""
    if body.get("key", key) != key:
        raise HTTPException(400, f"the body's key '{body['key']}' is not '{key}'")
    row = await plane.agent(agent)
    return await flags.set(row.id, {**body, "key": key}, who)


@router.post("/agents/{agent}/flags/{key}/kill")
async def kill_flag(
    agent: str,
    key: str,
    plane: Control,
    flags: Flags,
    who: Who,
) -> dict[str, Any]:
    row = await plane.agent(agent)
    return await flags.kill(row.id, key, who)


@router.delete("/agents/{agent}/flags/{key}", status_code=204)
async def delete_flag(
    agent: str,
    key: str,
    plane: Control,
    flags: Flags,
    who: Who,
) -> None:
    row = await plane.agent(agent)
    await flags.delete(row.id, key, who)


@router.get("/agents/{agent}/flags/{key}/evaluate")
async def evaluate_flag(
    agent: str,
    key: str,
    request: Request,
    plane: Control,
    flags: Flags,
    room: str = "",
    dispatch_id: str = "",
    metadata: str = "",
) -> dict[str, Any]:
    """What a session would get; job attributes as `attr.<name>=<value>` query parameters."""
    attributes = {
        k.removeprefix("attr."): v for k, v in request.query_params.items() if k.startswith("attr.")
    }
    session = Session(room=room, dispatch_id=dispatch_id, metadata=metadata, attributes=attributes)
    return flags.evaluate((await plane.agent(agent)).id, key, session)
