"""`/api/v1/keys`: make, list and revoke voicefleet API keys (admin keys only; `vf server keys`
does the same on the server's data dir)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from voicefleet.api.deps import ERROR_RESPONSES, PREFIX, Control, KeyStore, Who
from voicefleet.control.access import key_dict, parse_duration
from voicefleet.protocol.tokens import Role

router = APIRouter(prefix=PREFIX, responses=ERROR_RESPONSES)


class CreateKey(BaseModel):
    role: Role
    agent: str = ""  # an agent's id or name: the key acts on that agent only
    name: str = Field("", max_length=100)
    expires: str = ""  # a lifetime such as 30d or 12h; "" never expires


@router.post("/keys", status_code=201)
async def create_key(body: CreateKey, keys: KeyStore, plane: Control, who: Who) -> dict[str, Any]:
    """A new key. `token` (`vfk_<id>.<secret>`) is in this answer only: it is not stored."""
    expires_in = parse_duration(body.expires) if body.expires else None
    row, token = await keys.create(
        body.role, agent=body.agent, name=body.name, expires_in=expires_in, actor=who
    )
    return {**key_dict(row, await plane.agent_names()), "token": token}


@router.get("/keys")
async def list_keys(keys: KeyStore, plane: Control) -> list[dict[str, Any]]:
    """Every key, revoked and expired ones too (their events still name them)."""
    names = await plane.agent_names()
    return [key_dict(row, names) for row in await keys.list()]


@router.delete("/keys/{key_id}")
async def revoke_key(key_id: str, keys: KeyStore, plane: Control, who: Who) -> dict[str, Any]:
    """Revoke a key: the next request made with it is refused (401)."""
    return key_dict(await keys.revoke(key_id, who), await plane.agent_names())
