"""`POST /webhooks/livekit`: automatic dispatch when a LiveKit SFU announces a room.

LiveKit signs each webhook with a JWT in the Authorization header (no `Bearer`), made with the
SFU's API key, whose `sha256` claim is the base64 SHA-256 of the body.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
from collections import OrderedDict

from google.protobuf import json_format
from livekit.protocol import webhook
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from voicefleet.dispatch.service import DispatchService
from voicefleet.errors import AuthError, InvalidRequest, VoicefleetError
from voicefleet.protocol import tokens

log = logging.getLogger("voicefleet.dispatch")

MAX_BODY = 1 << 20


class WebhookReceiver:
    def __init__(self, service: DispatchService) -> None:
        self.service = service
        # LiveKit retries a webhook it thinks failed: remember recent event ids.
        self._seen: OrderedDict[str, None] = OrderedDict()

    def _secret_for(self, api_key: str) -> str | None:
        """Only the SFU signs webhooks: its key, or the project's when no SFU is configured.
        Not an instance key: those are held by agent code, which must not fake a room start."""
        project = self.service.project
        for key, secret in (project.room_token_key, (project.api_key, project.api_secret)):
            if api_key == key:
                return secret
        return None

    def authenticate(self, authorization: str | None) -> tokens.Claims:
        """The webhook's token, checked before its body is read."""
        return tokens.verify(tokens.bearer(authorization), self._secret_for)

    def verify(self, body: bytes, claims: tokens.Claims) -> webhook.WebhookEvent:
        """The event, once the body matches the token's sha256 claim."""
        signed = claims.raw.get("sha256")
        if not isinstance(signed, str) or not signed:
            raise AuthError("webhook token has no sha256 claim")
        digest = base64.b64encode(hashlib.sha256(body).digest())
        # Bytes: compare_digest refuses str with non-ASCII characters (TypeError, a 500).
        if not hmac.compare_digest(digest, signed.encode()):
            raise AuthError("webhook body does not match the token's sha256 claim")
        # Signed by the SFU but unreadable: a bad request, not an authentication failure.
        event = webhook.WebhookEvent()
        try:
            text = body.decode("utf-8")
            if not text.lstrip().startswith("{"):
                raise InvalidRequest("webhook body is not a WebhookEvent: not a JSON object")
            json_format.Parse(text, event, ignore_unknown_fields=True)
        except (json_format.ParseError, UnicodeDecodeError) as e:
            raise InvalidRequest(f"webhook body is not a WebhookEvent: {e}") from None
        return event

    def handle(self, event: webhook.WebhookEvent) -> list[str]:
        """Dispatch the configured agents to a started room; return the new dispatch ids."""
        if event.event != "room_started" or not event.room.name:
            return []
        if event.id in self._seen:
            return []
        created = []
        existing = {d.agent_name for d in self.service.book.in_room(event.room.name)}
        for agent_name in self.service.settings.auto_dispatch:
            if agent_name in existing:
                continue
            dispatch = self.service.create_dispatch(
                agent_name=agent_name,
                room=event.room.name,
                room_sid=event.room.sid,
                metadata=event.room.metadata,
            )
            created.append(dispatch.id)
        # Only once every agent is dispatched: a refused dispatch (queue full) answers non-2xx,
        # LiveKit sends the event again, and that retry must not be dropped as a duplicate.
        if event.id:
            self._seen[event.id] = None
            while len(self._seen) > 10_000:
                self._seen.popitem(last=False)
        log.info("room started", extra={"room": event.room.name, "dispatches": created})
        return created

    async def __call__(self, request: Request) -> Response:
        try:
            # Who sent it before what they sent: a stranger's body is never read. The body
            # itself is capped as it streams (the route's max_body_size, MAX_BODY).
            claims = self.authenticate(request.headers.get("authorization"))
            event = self.verify(await request.body(), claims)
            created = self.handle(event)
        except VoicefleetError as e:
            # Closed: a rejected sender's unread body is not taken in.
            headers = {"Connection": "close"} if isinstance(e, AuthError) else None
            return JSONResponse({"error": str(e)}, status_code=e.status, headers=headers)
        return JSONResponse({"dispatches": created})
