"""What every `/api/v1` route shares: its error responses, and the services it is handed.

The services are built by the composition root (`voicefleet.server`) and reach the routes
through `app.state`; a route names the one it needs (`Control`, `Dispatch`, `Flags`, `Jobs`).
Callers sign a token with the project's key and LiveKit's agent admin grant
(`{"agent": {"admin": true}}`, as `lk agent` does for LiveKit Cloud): see `guard.py`.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Header, HTTPException, Request
from pydantic import BaseModel

from voicefleet.api.guard import admin_claims
from voicefleet.autoscale.loop import Autoscaler
from voicefleet.control.service import ControlPlane, actor_of
from voicefleet.dispatch.service import DispatchService
from voicefleet.errors import AuthError
from voicefleet.flags.service import FlagService
from voicefleet.protocol import tokens
from voicefleet.store.records import Recorder


class ErrorBody(BaseModel):
    detail: str


def error(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


# What every control-API route may answer besides its success (and FastAPI's own 422).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: error("Bad request: the detail says which value and why"),
    401: error("No token, or one that is malformed, expired or wrongly signed"),
    403: error("The token is valid but lacks the agent admin grant of the project's key"),
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


def admin(request: Request, authorization: Annotated[str | None, Header()] = None) -> tokens.Claims:
    """The caller's verified claims. AdminGuard checked them before the body was read; check
    again where it did not run (an app mounted without it must not be open)."""
    claims: tokens.Claims | None = getattr(request.state, "claims", None)
    if claims is None:
        service = dispatch_service(request)
        try:
            claims = admin_claims(authorization, service.secret_for, service.project.api_key)
        except AuthError as e:
            raise HTTPException(e.status, str(e)) from None
        request.state.claims = claims
    return claims


Admin = Annotated[tokens.Claims, Depends(admin)]


def dispatch(request: Request, _: Admin) -> DispatchService:
    return dispatch_service(request)


def control(request: Request, _: Admin) -> ControlPlane:
    plane: ControlPlane = request.app.state.control
    return plane


def jobs(request: Request, _: Admin) -> Recorder:
    recorder: Recorder = request.app.state.recorder
    return recorder


def autoscaler(request: Request, _: Admin) -> Autoscaler:
    scaler: Autoscaler = request.app.state.autoscaler
    return scaler


def flag_service(request: Request) -> FlagService:
    service: FlagService = request.app.state.flags
    return service


def actor(claims: Admin) -> str:
    """Who the caller is, for the event log: its API key, through the API."""
    return actor_of(claims.api_key, "api")


Dispatch = Annotated[DispatchService, Depends(dispatch)]
Control = Annotated[ControlPlane, Depends(control)]
Jobs = Annotated[Recorder, Depends(jobs)]
Autoscale = Annotated[Autoscaler, Depends(autoscaler)]
Flags = Annotated[FlagService, Depends(flag_service)]
Actor = Annotated[str, Depends(actor)]
