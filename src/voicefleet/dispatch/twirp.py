"""LiveKit's `AgentDispatchService` over Twirp (protobuf or JSON), for the `livekit-api` client."""

from __future__ import annotations

import logging
from collections.abc import Callable

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from livekit.protocol import agent_dispatch as ad
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from voicefleet.dispatch.service import DispatchService
from voicefleet.errors import (
    InvalidRequest,
    NotFound,
    PermissionDenied,
    ProtocolError,
    VoicefleetError,
)
from voicefleet.protocol import tokens

log = logging.getLogger("voicefleet.dispatch")

PROTOBUF = "application/protobuf"
JSON = "application/json"
MAX_BODY = 1 << 20


def twirp_error(code: str, msg: str, status: int) -> Response:
    return JSONResponse({"code": code, "msg": msg}, status_code=status)


class BadRoute(InvalidRequest):
    """Twirp answers a request it cannot route (unknown method, unsupported Content-Type) so."""

    status = 404
    twirp_code = "bad_route"


async def _read_body(request: Request) -> bytes:
    """The request body, refused as soon as it passes MAX_BODY (never buffered whole)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise InvalidRequest(f"request body over {MAX_BODY} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise InvalidRequest(f"request body over {MAX_BODY} bytes")
    return bytes(body)


async def _decode(request: Request, message: Message) -> str:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in (PROTOBUF, JSON):
        raise BadRoute(f"unexpected Content-Type '{kind}': use {PROTOBUF} or {JSON}")
    body = await _read_body(request)
    try:
        if kind == PROTOBUF:
            message.ParseFromString(body)
        else:
            text = body.decode("utf-8") if body else "{}"
            if not text.lstrip().startswith("{"):
                raise ProtocolError(f"JSON body must be an object ({message.DESCRIPTOR.full_name})")
            json_format.Parse(text, message, ignore_unknown_fields=True)
    except (DecodeError, json_format.ParseError, UnicodeDecodeError) as e:
        raise ProtocolError(f"body is not a valid {message.DESCRIPTOR.full_name}: {e}") from None
    return kind


def _encode(kind: str, message: Message) -> Response:
    if kind == PROTOBUF:
        return Response(message.SerializeToString(), media_type=PROTOBUF)
    return Response(
        json_format.MessageToJson(message, preserving_proto_field_name=True), media_type=JSON
    )


def _authorize(request: Request, service: DispatchService, room: str) -> None:
    """LiveKit's rule (roomAdmin for the request's room), and one of voicefleet's: an instance's
    key, which the agent's code holds, reaches only rooms where that instance runs a job now
    (an agent may dispatch a second agent into its own call, not into anyone else's)."""
    claims = tokens.verify(tokens.bearer(request.headers.get("authorization")), service.secret_for)
    claims.require("roomAdmin", room)
    identity = tokens.instance_identity(claims.api_key)
    if identity is not None and not _runs_in(service, identity, room):
        raise PermissionDenied(
            f"instance {identity.instance}'s key reaches only rooms where it runs a job now, "
            f"not '{room}'"
        )


def _runs_in(service: DispatchService, identity: tokens.WorkerIdentity, room: str) -> bool:
    for dispatch in service.book.in_room(room):
        for job_id in dispatch.job_ids:
            job = service.book.jobs.get(job_id)
            if (
                job is not None
                and not job.ended
                and job.agent_id == identity.agent
                and job.instance == identity.instance
            ):
                return True
    return False


async def _create(request: Request, service: DispatchService) -> Response:
    req = ad.CreateAgentDispatchRequest()
    kind = await _decode(request, req)
    _authorize(request, service, req.room)
    dispatch = service.create_dispatch(
        agent_name=req.agent_name,
        room=req.room,
        metadata=req.metadata,
        attributes=dict(req.attributes),
        deployment=req.deployment,
        restart_policy=req.restart_policy,
    )
    await service.stored()  # answered once stored: a crash now loses no dispatch answered
    return _encode(kind, service.book.dispatch_proto(dispatch))


async def _list(request: Request, service: DispatchService) -> Response:
    req = ad.ListAgentDispatchRequest()
    kind = await _decode(request, req)
    _authorize(request, service, req.room)
    found = service.list_dispatches(req.room, req.dispatch_id)
    return _encode(
        kind,
        ad.ListAgentDispatchResponse(
            agent_dispatches=[service.book.dispatch_proto(d) for d in found]
        ),
    )


async def _delete(request: Request, service: DispatchService) -> Response:
    req = ad.DeleteAgentDispatchRequest()
    kind = await _decode(request, req)
    _authorize(request, service, req.room)
    dispatch = service.delete_dispatch(req.dispatch_id, req.room)
    return _encode(kind, service.book.dispatch_proto(dispatch))


METHODS: dict[str, Callable[[Request, DispatchService], object]] = {
    "CreateDispatch": _create,
    "ListDispatch": _list,
    "DeleteDispatch": _delete,
}


async def agent_dispatch_service(
    request: Request, service: DispatchService, method: str
) -> Response:
    handler = METHODS.get(method)
    if handler is None:
        return twirp_error(
            "bad_route", f"no method '{method}' in livekit.AgentDispatchService", 404
        )
    try:
        response = await handler(request, service)  # type: ignore[misc]
        assert isinstance(response, Response)
        return response
    except NotFound as e:
        return twirp_error(e.twirp_code, str(e), e.status)
    except VoicefleetError as e:
        status = 400 if e.status >= 500 else e.status
        return twirp_error(e.twirp_code, str(e), status)
    except Exception:
        # Twirp clients read the error from a JSON body; never answer with a bare 500 page.
        log.exception("AgentDispatchService.%s failed", method)
        return twirp_error("internal", f"{method} failed inside voicefleet (see its log)", 500)
