"""`/api/v1/events`: the event log, every agent's and the project's own (API keys, routing):
who changed what, when and from where, and what the platform did in answer."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from voicefleet.api.deps import ERROR_RESPONSES, PREFIX, Caller, Control, KeyStore
from voicefleet.control.access import parse_time
from voicefleet.store.models import EventRow, actor_parts

router = APIRouter(prefix=PREFIX, responses=ERROR_RESPONSES)


def event_dict(
    e: EventRow, agent_names: dict[str, str], key_names: dict[str, str] | None = None
) -> dict[str, Any]:
    """`actor` is the key that asked ("" for the platform's own doing) and `actor_name` its
    name, `via` where it came from ("api", "dashboard", "cli": the data dir on the server),
    `ip` the client's address ("" when local)."""
    key, via = actor_parts(e.actor)
    return {
        "id": e.id,
        "agent_id": e.agent_id,
        "agent": agent_names.get(e.agent_id, e.agent_id),
        "kind": e.kind,
        "message": e.message,
        "actor": key,
        "actor_name": (key_names or {}).get(key, ""),
        "via": via,
        "ip": e.ip,
        "at": e.at,
    }


@router.get("/events")
async def list_events(
    plane: Control,
    keys: KeyStore,
    caller: Caller,
    agent: str | None = None,
    since: str | None = None,
    until: str | None = None,
    kind: Annotated[list[str] | None, Query()] = None,
    actor: str | None = None,
    changes: bool = False,
    before: int | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """Newest first, `limit` at a time: pass `next` back as `before` for the page after.
    `agent` (id or name; a deleted agent's id still works), `since`/`until` (a duration ago
    such as 1h or 7d, an ISO date-time, or Unix seconds), `kind` (repeatable), `actor` (a
    key), `changes` (only what someone asked for). A key limited to one agent sees that
    agent's events only."""
    agent_id: str | None = None
    if agent is not None:
        found = await plane.find_agent(agent)
        agent_id = found.id if found is not None else agent
        caller.require_agent(found.name if found is not None else agent)
    elif caller.agent_id:
        agent_id = caller.agent_id
    rows = await plane.event_log(
        agent_id,
        limit,
        since=parse_time(since) if since else None,
        until=parse_time(until) if until else None,
        before=before,
        kinds=kind or (),
        actor=actor,
        changes_only=changes,
    )
    names = await plane.agent_names()
    key_names = {k.id: k.name for k in await keys.list()}
    return {
        "events": [event_dict(e, names, key_names) for e in rows],
        "next": rows[-1].id if len(rows) == limit else None,
    }
