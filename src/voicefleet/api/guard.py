"""Who may use the control API, checked before anything of the request is read.

FastAPI reads and parses a route's body before its dependencies run, so a dependency alone
would authenticate a caller only after buffering what they sent. `Guard` sits in front of the
app: a `/api/v1` request without a credential whose role allows it is answered at once, its
body never read. (Bodies of admitted requests are capped as they stream, by the app's
`max_body_size`.)

Two credentials open the API: a voicefleet API key (`Authorization: Bearer vfk_<id>.<secret>`,
with its role and, maybe, its one agent), or a token signed with the project's LiveKit key
holding LiveKit's agent admin grant (an admin, as before there were roles). Which role a route
needs is `required_role`'s answer, one table for the whole API.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Protocol

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from voicefleet.control.access import Principal, project_principal
from voicefleet.errors import AuthError, PermissionDenied
from voicefleet.protocol import tokens
from voicefleet.protocol.tokens import Role

API_PREFIX = "/api/v1/"
# Routes that authenticate their callers themselves: an agent's flag stream also takes the key
# of one of that agent's own instances (voicefleet.api.flags.stream_flags).
OWN_AUTH = re.compile(r"^/api/v1/agents/[^/]+/flags/stream$")
AGENT_PATH = re.compile(r"^/api/v1/agents/([^/]+)(/.*)?$")
# Changes a deployer may make; every other change is an admin's (a route added later is an
# admin's until it is listed here). Reads (GET, HEAD) are a viewer's.
DEPLOYER_CHANGES = tuple(
    (method, re.compile(pattern))
    for method, pattern in (
        ("POST", r"^/api/v1/agents/[^/]+/versions$"),  # upload: deploy a new version
        ("POST", r"^/api/v1/agents/[^/]+/rollouts$"),  # deploy a built version
        ("POST", r"^/api/v1/agents/[^/]+/(rollback|restart|promote)$"),
        ("POST", r"^/api/v1/agents/[^/]+/canary/[^/]+$"),  # promote, pause, resume, abort
        ("POST", r"^/api/v1/agents/[^/]+/scale$"),
        ("PUT", r"^/api/v1/agents/[^/]+/flags/[^/]+$"),
        ("DELETE", r"^/api/v1/agents/[^/]+/flags/[^/]+$"),
        ("POST", r"^/api/v1/agents/[^/]+/flags/[^/]+/kill$"),
        ("PUT", r"^/api/v1/routing/[^/]+$"),  # routing of agents deployed elsewhere
    )
)
# Reads that are an admin's: the list of API keys.
ADMIN_READS = re.compile(r"^/api/v1/keys(/.*)?$")
# What an agent-limited key may reach besides its agent's own routes: the list of agents (it
# sees its own only) and the event log (its agent's only).
SCOPED_EXTRA = ("/api/v1/agents", "/api/v1/events")


class KeyChecker(Protocol):
    async def authenticate(self, token: str) -> Principal: ...


def required_role(method: str, path: str) -> Role:
    if method in ("GET", "HEAD", "OPTIONS"):
        return Role.ADMIN if ADMIN_READS.match(path) else Role.VIEWER
    if any(method == m and pattern.match(path) for m, pattern in DEPLOYER_CHANGES):
        return Role.DEPLOYER
    return Role.ADMIN


def project_claims(
    token: str, secret_for: Callable[[str], str | None], project_key: str
) -> tokens.Claims:
    """The claims of a token signed with the project's own key (not an instance's) holding
    LiveKit's agent admin grant. Raises AuthError / PermissionDenied."""
    claims = tokens.verify(token, secret_for)
    if claims.api_key != project_key:
        raise PermissionDenied("the control API takes the project's key, not an instance's")
    claims.require_admin()
    return claims


async def authenticate(
    authorization: str | None,
    keys: KeyChecker,
    secret_for: Callable[[str], str | None],
    project_key: str,
) -> Principal:
    token = tokens.bearer(authorization)
    if tokens.is_key_token(token):
        return await keys.authenticate(token)
    return project_principal(project_claims(token, secret_for, project_key).api_key)


def authorize(principal: Principal, method: str, path: str) -> None:
    """PermissionDenied unless `principal` may make this request: its role, and its agent."""
    what = f"{method} {path}"
    principal.require(required_role(method, path), what)
    if not principal.agent_id:
        return
    found = AGENT_PATH.match(path)
    if found is not None:
        principal.require_agent(found.group(1))
    elif path.rstrip("/") not in SCOPED_EXTRA:
        raise PermissionDenied(
            f"key {principal.key} is limited to agent {principal.agent_name}: {what} is "
            "about every agent"
        )


class Guard:
    """ASGI middleware: `/api/v1` requests need a credential whose role allows them before the
    app sees them. The principal goes to `request.state.principal` (who acted, for events)."""

    def __init__(
        self, app: ASGIApp, secret_for: Callable[[str], str | None], project_key: str
    ) -> None:
        self.app = app
        self.secret_for = secret_for
        self.project_key = project_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and path.startswith(API_PREFIX) and not OWN_AUTH.match(path):
            keys: KeyChecker = scope["app"].state.keys
            try:
                principal = await authenticate(
                    Headers(scope=scope).get("authorization"),
                    keys,
                    self.secret_for,
                    self.project_key,
                )
                authorize(principal, scope["method"], path)
            except AuthError as e:
                # Connection: close: the body the caller may still be sending is never read.
                response = JSONResponse(
                    {"detail": str(e)}, status_code=e.status, headers={"Connection": "close"}
                )
                await response(scope, receive, send)
                return
            scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)
