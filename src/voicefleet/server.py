"""`vf server`: one process, one ASGI app: dispatch WebSocket, APIs, metrics, lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from voicefleet import __version__
from voicefleet.config import Project, Settings
from voicefleet.control.api import router as api_router
from voicefleet.dispatch.endpoint import worker_endpoint
from voicefleet.dispatch.service import DispatchService
from voicefleet.dispatch.twirp import agent_dispatch_service
from voicefleet.dispatch.webhooks import WebhookReceiver
from voicefleet.metrics import Metrics
from voicefleet.store.db import open_engine
from voicefleet.store.records import Recorder, load_open

log = logging.getLogger("voicefleet")


def create_app(settings: Settings, project: Project) -> FastAPI:
    metrics = Metrics()
    service = DispatchService(project, settings.dispatch, metrics)
    webhooks = WebhookReceiver(service)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = await open_engine(settings.database_url)
        recorder = Recorder(engine)
        service.book.job_listeners.append(recorder.job_changed)
        service.book.dispatch_listeners.append(recorder.dispatch_changed)
        dispatches, jobs = await load_open(engine)
        service.restore(dispatches, jobs, adopt_within=settings.dispatch.worker_silence_timeout)
        app.state.engine, app.state.recorder = engine, recorder
        background = [
            asyncio.create_task(recorder.run()),
            asyncio.create_task(service.scheduler.run_expiry()),
            asyncio.create_task(_every(1.0, service.fail_unadopted)),
        ]
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await service.scheduler.close()
            await recorder.flush()
            await engine.dispose()

    app = FastAPI(title="voicefleet", version=__version__, lifespan=lifespan)
    app.state.dispatch = service
    app.include_router(api_router)

    @app.websocket("/agent")
    async def agent_socket(ws: WebSocket) -> None:
        await worker_endpoint(ws, service)

    @app.post("/twirp/livekit.AgentDispatchService/{method}", include_in_schema=False)
    async def twirp(request: Request, method: str) -> Response:
        return await agent_dispatch_service(request, service, method)

    @app.post("/webhooks/livekit")
    async def livekit_webhook(request: Request) -> Response:
        return await webhooks(request)

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> Response:
        return PlainTextResponse("ok\n")

    @app.get("/readyz", include_in_schema=False)
    def readyz(request: Request) -> Response:
        ready = hasattr(request.app.state, "engine")
        return PlainTextResponse("ready\n" if ready else "starting\n", 200 if ready else 503)

    return app


async def _every(interval: float, fn: Any) -> None:
    while True:
        await asyncio.sleep(interval)
        fn()


async def serve(settings: Settings, project: Project) -> None:
    config = uvicorn.Config(
        create_app(settings, project),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        ws_ping_interval=settings.ws_ping_interval,
        ws_ping_timeout=settings.ws_ping_timeout,
        ws_max_size=1 << 20,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    await _Server(config, settings).serve()


class _Server(uvicorn.Server):
    """uvicorn's server, announcing where it listens once the socket is bound (port 0 too)."""

    def __init__(self, config: uvicorn.Config, settings: Settings) -> None:
        super().__init__(config)
        self.settings = settings

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            _announce(self, self.settings)


def _announce(server: uvicorn.Server, settings: Settings) -> None:
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    url = f"http://{host}:{port}"
    log.info(
        "voicefleet %s serving on %s (workers: LIVEKIT_URL=ws://%s:%s)",
        __version__,
        url,
        host,
        port,
    )
    if settings.ready_file is not None:
        tmp = settings.ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"url": url, "pid": os.getpid()}))
        tmp.replace(settings.ready_file)
