"""`GET /agent`: one LiveKit worker's WebSocket, from the token check to its last frame."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from livekit.protocol import agent, models
from starlette.responses import PlainTextResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from voicefleet import __version__
from voicefleet.dispatch.jobs import new_id
from voicefleet.dispatch.registry import Worker
from voicefleet.dispatch.service import DispatchService
from voicefleet.errors import AuthError, ProtocolError
from voicefleet.protocol import tokens
from voicefleet.protocol.frames import parse_worker_message

log = logging.getLogger("voicefleet.dispatch")

# WebSocket close codes (RFC 6455): 1002 protocol error, 1007 bad payload, 1008 policy.
CLOSE_PROTOCOL_ERROR = 1007
CLOSE_TIMEOUT = 1008


def _authenticate(ws: WebSocket, service: DispatchService) -> tuple[str, tokens.WorkerIdentity]:
    header = ws.headers.get("authorization")
    token = tokens.bearer(header) if header else ws.query_params.get("access_token", "")
    if not token:
        raise AuthError("missing Authorization header with a LiveKit access token")
    claims = tokens.verify(token, service.secret_for)
    claims.require("agent")
    # A managed instance signs with a key of its own, which names it; anything else is unmanaged.
    identity = tokens.instance_identity(claims.api_key) or tokens.UNMANAGED
    worker_token = ws.query_params.get("worker_token")
    if worker_token:
        identity = tokens.verify_worker_token(worker_token, service.project.api_secret)
    return claims.api_key, identity


async def worker_endpoint(ws: WebSocket, service: DispatchService) -> None:
    try:
        api_key, identity = _authenticate(ws, service)
    except AuthError as e:
        service.metrics.worker_connections.labels("rejected").inc()
        log.info("worker rejected", extra={"reason": str(e), "client": str(ws.client)})
        await ws.send_denial_response(PlainTextResponse(f"{e}\n", status_code=e.status))
        return
    await ws.accept()
    worker: Worker | None = None
    reason = "disconnected"
    try:
        worker = await _register(ws, service, api_key, identity)
        reason = await _serve(ws, service, worker)
    except ProtocolError as e:
        service.metrics.worker_connections.labels("protocol_error").inc()
        reason = f"was disconnected for a protocol error ({e})"
        log.warning("closing worker connection", extra={"reason": str(e), "worker": worker})
        with contextlib.suppress(Exception):
            await ws.close(CLOSE_PROTOCOL_ERROR, str(e)[:120])
    except WebSocketDisconnect:
        reason = "disconnected"
    finally:
        if worker is not None and service.closing:
            service.registry.remove(worker)  # its jobs go on; the next start adopts them
        elif worker is not None:
            service.scheduler.worker_gone(worker, reason)
            log.info("worker gone", extra={"worker": worker.id, "reason": reason})


async def _receive(ws: WebSocket, timeout: float) -> agent.WorkerMessage | None:
    """The next frame, or None when the peer closed. Text frames are protocol errors."""
    message = await asyncio.wait_for(ws.receive(), timeout)
    if message["type"] == "websocket.disconnect":
        return None
    data = message.get("bytes")
    if data is None:
        raise ProtocolError("worker frames must be binary protobuf, got a text frame")
    return parse_worker_message(data)


async def _register(
    ws: WebSocket, service: DispatchService, api_key: str, identity: tokens.WorkerIdentity
) -> Worker:
    try:
        msg = await _receive(ws, service.settings.register_timeout)
    except TimeoutError:
        raise ProtocolError(
            f"no register message within {service.settings.register_timeout:g}s"
        ) from None
    if msg is None:
        raise WebSocketDisconnect()
    if msg.WhichOneof("message") != "register":
        raise ProtocolError(f"first message must be register, got {msg.WhichOneof('message')}")
    register = msg.register
    if register.type not in agent.JobType.values():
        raise ProtocolError(f"unknown job type {register.type}")
    worker = service.registry.add(new_id("AW_"), register, api_key=api_key, identity=identity)
    worker.send(
        agent.ServerMessage(
            register=agent.RegisterWorkerResponse(
                worker_id=worker.id,
                server_info=models.ServerInfo(
                    edition=models.ServerInfo.Edition.Standard,
                    version=f"voicefleet-{__version__}",
                    protocol=16,
                    agent_protocol=1,
                    region="local",
                ),
            )
        )
    )
    service.metrics.worker_connections.labels("registered").inc()
    log.info(
        "worker registered",
        extra={
            "worker": worker.id,
            "agent_name": register.agent_name,
            "pool": worker.pool,
            "sdk_version": register.version,
            "deployment": register.deployment,
        },
    )
    return worker


async def _serve(ws: WebSocket, service: DispatchService, worker: Worker) -> str:
    """Pump frames both ways until the worker leaves; return why it left."""
    writer = asyncio.create_task(_write(ws, worker))
    silence = service.settings.worker_silence_timeout
    try:
        while True:
            try:
                msg = await _receive(ws, silence)
            except TimeoutError:
                with contextlib.suppress(Exception):
                    await ws.close(CLOSE_TIMEOUT, "no message from the worker")
                return f"sent nothing for {silence:g}s and was disconnected"
            if msg is None:
                return "disconnected"
            _handle(service, worker, msg)
            if writer.done():
                return "disconnected (send failed)"
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await writer


async def _write(ws: WebSocket, worker: Worker) -> None:
    while True:
        data = await worker.outbox.get()
        await ws.send_bytes(data)


def _handle(service: DispatchService, worker: Worker, msg: agent.WorkerMessage) -> None:
    which = msg.WhichOneof("message")
    if which == "availability":
        fut = worker.offers.get(msg.availability.job_id)
        if fut is not None and not fut.done():
            fut.set_result(msg.availability)
        else:
            log.debug("late or unknown availability answer", extra={"worker": worker.id})
    elif which == "update_worker":
        service.registry.update(worker, msg.update_worker)
    elif which == "update_job":
        service.scheduler.job_update(worker, msg.update_job)
    elif which == "ping":
        worker.send(
            agent.ServerMessage(
                pong=agent.WorkerPong(
                    last_timestamp=msg.ping.timestamp, timestamp=int(time.time() * 1000)
                )
            )
        )
    elif which == "migrate_job":
        service.scheduler.adopt(worker, list(msg.migrate_job.job_ids))
    elif which == "register":
        raise ProtocolError("worker sent register twice")
    else:
        log.debug("ignored worker message", extra={"worker": worker.id, "message": which})
