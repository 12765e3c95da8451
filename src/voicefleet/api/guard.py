"""Who may use the control API, checked before anything of the request is read.

FastAPI reads and parses a route's body before its dependencies run, so a dependency alone
would authenticate a caller only after buffering what they sent. `AdminGuard` sits in front of
the app: a `/api/v1` request without the project's admin credential is answered at once, its
body never read. (Bodies of admitted requests are capped as they stream, by the app's
`max_body_size`.)
"""

from __future__ import annotations

import re
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from voicefleet.errors import AuthError, PermissionDenied
from voicefleet.protocol import tokens

API_PREFIX = "/api/v1/"
# Routes that authenticate their callers themselves: an agent's flag stream also takes the key
# of one of that agent's own instances (voicefleet.api.flags.stream_flags).
OWN_AUTH = re.compile(r"^/api/v1/agents/[^/]+/flags/stream$")


def admin_claims(
    authorization: str | None, secret_for: Callable[[str], str | None], project_key: str
) -> tokens.Claims:
    """The claims of a control-API caller: a valid token signed with the project's own key (not
    an instance's) holding LiveKit's agent admin grant. Raises AuthError / PermissionDenied."""
    claims = tokens.verify(tokens.bearer(authorization), secret_for)
    if claims.api_key != project_key:
        raise PermissionDenied("the control API takes the project's key, not an instance's")
    claims.require_admin()
    return claims


class AdminGuard:
    """ASGI middleware: `/api/v1` requests need the admin credential before the app sees them.
    The verified claims go to `request.state.claims` (who acted, for event logs)."""

    def __init__(
        self, app: ASGIApp, secret_for: Callable[[str], str | None], project_key: str
    ) -> None:
        self.app = app
        self.secret_for = secret_for
        self.project_key = project_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and path.startswith(API_PREFIX) and not OWN_AUTH.match(path):
            try:
                claims = admin_claims(
                    Headers(scope=scope).get("authorization"), self.secret_for, self.project_key
                )
            except AuthError as e:
                # Connection: close: the body the caller may still be sending is never read.
                response = JSONResponse(
                    {"detail": str(e)}, status_code=e.status, headers={"Connection": "close"}
                )
                await response(scope, receive, send)
                return
            scope.setdefault("state", {})["claims"] = claims
        await self.app(scope, receive, send)
