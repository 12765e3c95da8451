"""The dashboard's commands: rollback, the canary's promote/pause/resume/abort and scale on an
agent; set, add and kill feature flags. Each calls the same service `/api/v1` calls, as the
logged-in key "via dashboard" (the event log's "by"); their errors answer as the API's.
"""

from __future__ import annotations

import logging
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import Response

from voicefleet.control.service import DEFAULT_DEPLOYMENT
from voicefleet.dashboard import web
from voicefleet.dashboard.agent_page import ACTIONS, CANARY_COMMANDS
from voicefleet.dashboard.flags_page import changed
from voicefleet.errors import InvalidRequest, NotFound
from voicefleet.protocol.tokens import Role

log = logging.getLogger("voicefleet.dashboard")

router = APIRouter(include_in_schema=False)


@router.post("/dashboard/agents/{name}/actions")
async def agent_action(name: str, request: Request) -> Response:
    """promote, pause, resume or abort the running canary; roll back (to the previous version,
    or the one given); scale to a fixed number of instances."""
    checked = await web.guarded_post(request)
    if isinstance(checked, Response):
        return checked
    session, form = checked
    assert session.principal is not None  # a session is only handed out with one
    who = web.actor(request, session)
    plane = web.control(request)
    agent = await plane.agent(name)
    action = form.get("command", "")
    deployment = form.get("deployment") or DEFAULT_DEPLOYMENT
    if action not in ACTIONS:
        raise InvalidRequest(f"unknown command '{action}' (one of {', '.join(ACTIONS)})")
    session.principal.require(Role.DEPLOYER, f"{action} on {name}")
    rollout = ""
    if action in CANARY_COMMANDS:
        found = await plane.rollout_command(agent, deployment, action, who)
        message, rollout = f"{action} sent to canary {found.to_version} on {deployment}", found.id
    elif action == "scale":
        try:
            replicas = int(form.get("replicas", ""))
        except ValueError:
            raise InvalidRequest("give the number of instances") from None
        await plane.scale(agent, deployment, replicas, actor=who)
        message = f"{deployment} scaled to {replicas} instance(s)"
    else:
        found = await plane.rollback(agent, deployment, form.get("version") or None, who)
        message = f"rolling {deployment} back to {found.to_version} ({found.id})"
        rollout = found.id
    log.info("dashboard: %s on %s/%s by %s", action, name, deployment, session.api_key)
    return web.answer(
        request, message, f"/dashboard/agents/{quote(name, safe='')}", rollout=rollout
    )


@router.post("/dashboard/flags/{name}")
@router.post("/dashboard/flags/{name}/{key}")
async def flag_action(name: str, request: Request, key: str = "") -> Response:
    """set (value, percentage, rules), kill, or create (key, type, value) a flag."""
    checked = await web.guarded_post(request)
    if isinstance(checked, Response):
        return checked
    session, form = checked
    assert session.principal is not None  # a session is only handed out with one
    who = web.actor(request, session)
    plane, service = web.control(request), web.flags(request)
    command = form.get("command", "")
    session.principal.require(Role.DEPLOYER, f"changing the flags of {name}")
    agent = await plane.agent(name)
    if command == "create":
        key = form.get("key", "").strip()
        try:
            service.get(agent.id, key)
        except NotFound:
            pass
        else:
            raise InvalidRequest(f"{name} already has a flag '{key}': edit it instead")
        flag = await service.set(agent.id, {**changed(None, form), "key": key}, who)
        message = f"flag {key} added to {name}"
    elif command == "set":
        current = service.get(agent.id, key)
        flag = await service.set(agent.id, {**changed(current, form), "key": key}, who)
        message = f"flag {key} of {name} set"
    elif command == "kill":
        flag = await service.kill(agent.id, key, who)
        message = f"flag {key} of {name} killed"
    else:
        raise InvalidRequest(f"unknown command '{command}' (set, create or kill)")
    log.info("dashboard: flag %s %s on %s by %s", key, command, name, session.api_key)
    return web.answer(request, message, "/dashboard/flags", flag=flag)
