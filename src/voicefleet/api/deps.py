"""What every `/api/v1` route shares: its error responses, and the services it is handed.

The services are built by the composition root (`voicefleet.server`) and reach the routes
through `app.state`; a route names the one it needs (`Control`, `Dispatch`, `Flags`, `Jobs`).
Callers send a voicefleet API key (its role says what it may do), or a token signed with the
project's key holding LiveKit's agent admin grant (`{"agent": {"admin": true}}`, as `lk agent`
does for LiveKit Cloud): see `guard.py`.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Header, HTTPException, Request
from pydantic import BaseModel

from voicefleet.api.guard import authenticate, authorize
from voicefleet.autoscale.loop import Autoscaler
from voicefleet.control.access import Keys, Principal
from voicefleet.control.service import ControlPlane
from voicefleet.dispatch.service import DispatchService
from voicefleet.errors import AuthError
from voicefleet.flags.service import FlagService
from voicefleet.store.models import API, Actor
from voicefleet.store.records import Recorder


class ErrorBody(BaseModel):
    detail: str


def error(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


# What every control-API route may answer besides its success (and FastAPI's own 422).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: error("Bad request: the detail says which value and why"),
    401: error("No key, or one that is unknown, revoked, expired, malformed or wrongly signed"),
    403: error("The key is valid but its role (or its one agent) does not allow this"),
    404: error("No such agent, version, rollout, job or instance"),
    413: error("Request body over the limit (1 MiB; bundles 50 MB)"),
    503: error("The data dir is full or unavailable"),
}
TEXT: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/plain": {"schema": {"type": "string"}}}}
}
PREFIX = "/api/v1"


def dispatch_service(request: Request) -> DispatchService:
    service: DispatchService = request.app.state.dispatch
    return service


async def caller(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> Principal:
    """Who the caller is. The Guard checked it, and the route's role, before the body was read;
    check again where it did not run (an app mounted without it must not be open)."""
    principal: Principal | None = getattr(request.state, "principal", None)
    if principal is None:
        service = dispatch_service(request)
        try:
            principal = await authenticate(
                authorization, request.app.state.keys, service.secret_for, service.project.api_key
            )
            authorize(principal, request.method, request.url.path)
        except AuthError as e:
            raise HTTPException(e.status, str(e)) from None
        request.state.principal = principal
    return principal


Caller = Annotated[Principal, Depends(caller)]


def dispatch(request: Request, _: Caller) -> DispatchService:
    return dispatch_service(request)


def control(request: Request, _: Caller) -> ControlPlane:
    plane: ControlPlane = request.app.state.control
    return plane


def jobs(request: Request, _: Caller) -> Recorder:
    recorder: Recorder = request.app.state.recorder
    return recorder


def autoscaler(request: Request, _: Caller) -> Autoscaler:
    scaler: Autoscaler = request.app.state.autoscaler
    return scaler


def key_service(request: Request, _: Caller) -> Keys:
    keys: Keys = request.app.state.keys
    return keys


def flag_service(request: Request) -> FlagService:
    service: FlagService = request.app.state.flags
    return service


def client_ip(request: Request) -> str:
    return request.client.host if request.client else ""


def actor(request: Request, principal: Caller) -> Actor:
    """Who the caller is, for the event log: its key, through the API, from its address."""
    return principal.actor(API, client_ip(request))


Dispatch = Annotated[DispatchService, Depends(dispatch)]
Control = Annotated[ControlPlane, Depends(control)]
Jobs = Annotated[Recorder, Depends(jobs)]
Autoscale = Annotated[Autoscaler, Depends(autoscaler)]
Flags = Annotated[FlagService, Depends(flag_service)]
KeyStore = Annotated[Keys, Depends(key_service)]
Who = Annotated[Actor, Depends(actor)]
