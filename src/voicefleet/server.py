"""`vf server`: one process, one ASGI app: dispatch WebSocket, APIs, metrics, lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import socket
from collections.abc import AsyncIterator

import uvicorn
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.exc import DBAPIError
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from voicefleet import __version__, logs
from voicefleet.api import ROUTERS, UPLOADS_AT_ONCE, Guard
from voicefleet.autoscale.loop import Autoscaler
from voicefleet.build.image import ImageBuilder
from voicefleet.build.local import LocalBuilder
from voicefleet.config import Project, RuntimeKind, Settings
from voicefleet.control.access import PEPPER_PURPOSE, Keys
from voicefleet.control.builds import EnvironmentBuilds, ImageBuilds, VersionBuilder
from voicefleet.control.service import ControlPlane
from voicefleet.control.sizing import Sizing
from voicefleet.control.telemetry import Telemetry
from voicefleet.control.tls import TRUST_VARIABLES, instance_host
from voicefleet.dashboard import router as dashboard
from voicefleet.dashboard.changes import Changes
from voicefleet.dispatch.endpoint import worker_endpoint
from voicefleet.dispatch.service import DispatchService
from voicefleet.dispatch.twirp import agent_dispatch_service
from voicefleet.dispatch.webhooks import MAX_BODY as WEBHOOK_MAX_BODY
from voicefleet.dispatch.webhooks import WebhookReceiver
from voicefleet.errors import StorageFull, VoicefleetError, full_disk
from voicefleet.flags.install import install_sdk
from voicefleet.flags.service import FlagService
from voicefleet.fleet import Instances, Paths
from voicefleet.gateway import Gateway, LiveKitTarget
from voicefleet.metrics import Metrics
from voicefleet.rollout.runner import Rollouts
from voicefleet.runtime import Runtime
from voicefleet.runtime.local import LocalRuntime
from voicefleet.store.db import open_engine
from voicefleet.store.records import Recorder, load_open
from voicefleet.store.repo import Repo
from voicefleet.store.secrets import SecretBox

log = logging.getLogger("voicefleet")

MAX_BODY = 1 << 20  # any request's body, unless its route says otherwise


def create_app(settings: Settings, project: Project) -> FastAPI:
    metrics = Metrics()
    service = DispatchService(project, settings.dispatch, metrics)
    webhooks = WebhookReceiver(service)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The composition root: every service is built here and handed the narrow parts it
        # uses; listeners are wired here; the background tasks are this function's own.
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = await open_engine(settings.database_url)
        repo = Repo(engine)
        paths = Paths(settings.data_dir)
        install_sdk(settings.data_dir)  # agents import voicefleet.sdk (flags) from here
        flags = FlagService(repo)
        await flags.start()
        fleet = Instances(
            repo,
            service,
            _runtime(settings),
            SecretBox.open(settings.data_dir),
            paths,
            worker_url=lambda: settings.instance_url or str(app.state.worker_url),
            keep_warm=settings.keep_warm,
            # The CA bundle the server was told to trust: the instances verify its certificate.
            trust={k: os.environ[k] for k in TRUST_VARIABLES if os.environ.get(k)},
        )
        rollouts = Rollouts(repo, service, fleet)
        sizing = Sizing(repo, service, fleet, rollouts)
        runs_images = settings.runtime == RuntimeKind.KUBERNETES
        plane = ControlPlane(
            repo,
            service,
            fleet,
            rollouts,
            sizing,
            _builds(settings, paths),
            fleet.box,
            paths,
            runs_images=runs_images,
        )
        keys = Keys(repo, fleet.box.derive(PEPPER_PURPOSE))
        autoscaler = Autoscaler(service, repo, sizing)
        telemetry = Telemetry(metrics, repo, service, fleet, autoscaler)
        plane.on_build = telemetry.build_finished
        recorder = Recorder(engine, failures=metrics.failed_sessions)
        service.on_job_change(recorder.job_changed)
        service.on_dispatch_change(recorder.dispatch_changed)
        service.on_store(recorder.stored)
        # What the dashboard shows changed: its pages re-render then (and slowly otherwise).
        changes = Changes()
        repo.on_write(changes.mark)
        service.on_job_change(changes.mark)
        service.on_worker_registered(changes.mark)
        service.on_weights_change(changes.mark)
        dispatches, jobs = await load_open(engine)
        service.restore(dispatches, jobs, adopt_within=settings.dispatch.worker_silence_timeout)
        await telemetry.refresh()  # before any job: restored ones are counted by agent
        background = [
            asyncio.create_task(recorder.run()),
            asyncio.create_task(service.run_expiry()),
            asyncio.create_task(telemetry.run()),
        ]
        if settings.livekit_url and settings.livekit_api_key and settings.livekit_api_secret:
            # Gateway mode: voicefleet is the LiveKit server's worker for its agents; its
            # task leaves LiveKit when cancelled below, and the calls running here go on.
            target = LiveKitTarget(
                settings.livekit_url, settings.livekit_api_key, settings.livekit_api_secret
            )
            gateway = Gateway(service, target, settings.gateway, can_start=autoscaler.can_start)
            background.append(asyncio.create_task(gateway.run()))

        async def take_back() -> None:
            """What the last run left: routes, instances, unfinished rollouts and builds. Run
            once the server listens: instances need its address (known only then, port 0)."""
            await plane.restore()
            await fleet.adopt_all()
            background.append(asyncio.create_task(fleet.reap_retired()))
            background.append(asyncio.create_task(fleet.joblogs.run()))
            background.append(asyncio.create_task(autoscaler.run()))
            await rollouts.resume()

        app.state.flags, app.state.control, app.state.autoscaler = flags, plane, autoscaler
        app.state.keys = keys
        app.state.engine, app.state.recorder = engine, recorder
        app.state.telemetry = telemetry
        app.state.changes = changes
        app.state.take_back = take_back
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await rollouts.close()
            await plane.close()
            await fleet.close(leave_running=settings.keep_instances)
            await service.close()
            await recorder.flush()
            await engine.dispose()

    # Every request body is capped as it streams (1 MiB; uploads have their own cap), so no
    # request, authenticated or not, makes the server buffer more than that.
    app = FastAPI(
        title="voicefleet", version=__version__, lifespan=lifespan, max_body_size=MAX_BODY
    )
    app.add_middleware(Guard, secret_for=service.secret_for, project_key=project.api_key)
    app.state.dispatch = service
    app.state.upload_slots = asyncio.Semaphore(UPLOADS_AT_ONCE)
    for router in ROUTERS:
        app.include_router(router)
    app.include_router(dashboard)  # `/` and `/dashboard/…`: its own login, the same services

    @app.exception_handler(VoicefleetError)
    async def voicefleet_error(request: Request, exc: VoicefleetError) -> Response:
        return JSONResponse({"detail": str(exc), "code": exc.twirp_code}, status_code=exc.status)

    @app.exception_handler(OSError)
    @app.exception_handler(DBAPIError)  # SQLite's "database or disk is full"
    async def storage_full(request: Request, exc: Exception) -> Response:
        # A full disk is the operator's to fix, not a bug: a 503 naming the data dir, and one
        # log line instead of a traceback per request. Any other error is a bug: a 500.
        reason = full_disk(exc)
        if reason is None:
            raise exc
        full = StorageFull(settings.data_dir, reason)
        log.warning("%s %s refused: %s", request.method, request.url.path, full)
        return await voicefleet_error(request, full)

    @app.websocket("/agent")
    async def agent_socket(ws: WebSocket) -> None:
        await worker_endpoint(ws, service)

    async def twirp(request: Request) -> Response:
        return await agent_dispatch_service(request, service, request.path_params["method"])

    # Listed for completeness; requests reach it through `_HotPath` below, ahead of FastAPI.
    app.router.routes.append(Route(TWIRP_PREFIX + "{method}", twirp, methods=["POST"]))

    @app.post("/webhooks/livekit", max_body_size=WEBHOOK_MAX_BODY)
    async def livekit_webhook(request: Request) -> Response:
        return await webhooks(request)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus(request: Request) -> Response:
        telemetry: Telemetry | None = getattr(request.app.state, "telemetry", None)
        if telemetry is not None:
            try:
                await telemetry.refresh()  # the store's agents, instances, rollouts as of now
            except Exception:  # the dispatcher's figures are still worth serving
                log.exception("reading the store for /metrics failed; serving the last read")
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> Response:
        return PlainTextResponse("ok\n")

    @app.get("/readyz", include_in_schema=False)
    def readyz(request: Request) -> Response:
        ready = hasattr(request.app.state, "engine")
        return PlainTextResponse("ready\n" if ready else "starting\n", 200 if ready else 503)

    return app


def _runtime(settings: Settings) -> Runtime:
    if settings.runtime == RuntimeKind.KUBERNETES:
        from voicefleet.runtime.kubernetes import KubernetesRuntime, connect

        kube = settings.kubernetes
        # Pods run their image's own command: voicefleet's Dockerfiles end in the agent's
        # `start` (Python or Node.js), and a prebuilt image knows its own.
        return KubernetesRuntime(connect(kube.kubeconfig, kube.namespace), command=None)
    return LocalRuntime()


def _builds(settings: Settings, paths: Paths) -> VersionBuilder | None:
    """How uploads are built: environments here (local runtime), or images pushed to the
    registry (Kubernetes runtime; None without a registry: prebuilt images only)."""
    if settings.runtime != RuntimeKind.KUBERNETES:
        return EnvironmentBuilds(LocalBuilder(settings.env_cache or paths.envs))
    images = settings.images
    if not images.registry:
        return None
    builder = ImageBuilder(images.base, work_dir=paths.image_builds, ca_bundle=images.build_ca)
    return ImageBuilds(
        builder, images.registry, tls_verify=not images.insecure, authfile=images.authfile
    )


TWIRP_PREFIX = "/twirp/livekit.AgentDispatchService/"


class _HotPath:
    """CreateDispatch is the one request made thousands of times a second: it goes straight to
    its handler, skipping FastAPI's middleware and routing (a third of its cost, profiled)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.service: DispatchService = app.state.dispatch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and scope["method"] == "POST" and path.startswith(TWIRP_PREFIX):
            request = Request(scope, receive)
            response = await agent_dispatch_service(
                request, self.service, path[len(TWIRP_PREFIX) :]
            )
            await response(scope, receive, send)
        else:
            await self.app(scope, receive, send)


async def serve(settings: Settings, project: Project) -> None:
    app = create_app(settings, project)
    config = uvicorn.Config(
        _HotPath(app),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        ws_ping_interval=settings.ws_ping_interval,
        ws_ping_timeout=settings.ws_ping_timeout,
        ws_max_size=1 << 20,
        access_log=False,
        ssl_certfile=str(settings.ssl_certfile) if settings.ssl_certfile else None,
        ssl_keyfile=str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
        # Longer than clients' own keep-alive (aiohttp, which livekit-api uses: 15 s), so a
        # client never reuses a connection the server is closing at that moment.
        timeout_keep_alive=75,
        timeout_graceful_shutdown=5,
    )
    logs.redact("uvicorn", "uvicorn.error", "uvicorn.access")  # handlers made by the Config
    await _Server(config, app, settings).serve()


class _Server(uvicorn.Server):
    """uvicorn's server, announcing where it listens once the socket is bound (port 0 too)."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, settings: Settings) -> None:
        super().__init__(config)
        self.app, self.settings = app, settings

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # What exists now (imported frameworks, the app) lives as long as the process: keep
        # it out of the cyclic GC, whose full passes over it stalled dispatches (p99 x20).
        gc.collect()
        gc.freeze()
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            app, tls = self.app, self.settings.tls
            # What the instances started here connect to: an address the certificate names.
            instances = instance_host(host, self.settings.ssl_certfile)
            app.state.worker_url = f"{'wss' if tls else 'ws'}://{instances}:{port}"
            # Instances need the server's address, known only now (port 0): take them back now.
            await app.state.take_back()
            shown = f"[{host}]" if ":" in host else host
            _announce(f"{'https' if tls else 'http'}://{shown}:{port}", self.settings)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.app.state.dispatch.closing = True
        await super().shutdown(sockets)


def _announce(url: str, settings: Settings) -> None:
    log.info(
        "voicefleet %s serving on %s (workers: LIVEKIT_URL=%s)",
        __version__,
        url,
        "ws" + url.removeprefix("http"),
    )
    if settings.ready_file is not None:
        tmp = settings.ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"url": url, "pid": os.getpid()}))
        tmp.replace(settings.ready_file)
