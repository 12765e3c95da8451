"""`vf`: the voicefleet command line."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from voicefleet import __version__, logs
from voicefleet.build.image import check_reference
from voicefleet.cli import backup
from voicefleet.cli.agent import app as agent_app
from voicefleet.cli.events import events
from voicefleet.cli.flags import app as flags_app
from voicefleet.cli.keys import app as keys_app
from voicefleet.config import (
    DispatchSettings,
    ImageSettings,
    KubernetesSettings,
    RuntimeKind,
    Settings,
)
from voicefleet.control.projects import check_data_dir, load_project
from voicefleet.errors import CannotStart, VoicefleetError

app = typer.Typer(
    name="vf",
    help="voicefleet: run LiveKit voice agents in production on your own machines.",
    no_args_is_help=True,
    add_completion=False,
)
err = Console(stderr=True, soft_wrap=True)
app.add_typer(agent_app, name="agent")
app.add_typer(flags_app, name="flags")
app.command()(events)
# `vf server` runs the server; its subcommands (keys, backup, restore) act on its data dir.
server_app = typer.Typer(
    help="Run the voicefleet server (workers connect at ws://HOST:PORT; wss:// with "
    "--ssl-certfile/--ssl-keyfile), manage its API keys, or back up and restore its data dir.",
    no_args_is_help=False,
)
server_app.add_typer(keys_app, name="keys")
app.add_typer(server_app, name="server")
server_app.command()(backup.backup)
server_app.command()(backup.restore)


def _version(value: bool) -> None:
    if value:
        print(f"voicefleet {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    pass


@server_app.callback(invoke_without_command=True)
def server(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 7880,
    data_dir: Annotated[
        Path, typer.Option(envvar="VF_DATA_DIR", help="Where the database and credentials live.")
    ] = Path(".voicefleet"),
    env_cache: Annotated[
        Path | None,
        typer.Option(
            envvar="VF_ENV_CACHE",
            help="Where built Python environments are kept, one per dependency digest "
            "(default: envs/ in the data dir). Servers may share one.",
        ),
    ] = None,
    database_url: Annotated[
        str,
        typer.Option(
            envvar="VF_DATABASE_URL",
            help="Store URL, e.g. postgresql+asyncpg://user@host/db (default: SQLite in data dir).",
        ),
    ] = "",
    dev: Annotated[
        bool,
        typer.Option(help="Dev project: API key 'devkey', secret 'secret' (as livekit-server)."),
    ] = False,
    livekit_url: Annotated[
        str, typer.Option(envvar="VF_LIVEKIT_URL", help="LiveKit SFU url given to workers' jobs.")
    ] = "",
    livekit_api_key: Annotated[
        str, typer.Option(envvar="VF_LIVEKIT_API_KEY", help="SFU key that signs room tokens.")
    ] = "",
    livekit_api_secret: Annotated[
        str, typer.Option(envvar="VF_LIVEKIT_API_SECRET", help="SFU secret for room tokens.")
    ] = "",
    auto_dispatch: Annotated[
        list[str] | None,
        typer.Option(help="Agent name to dispatch to every room_started webhook (repeatable)."),
    ] = None,
    availability_timeout: Annotated[
        float, typer.Option(help="Seconds a worker has to answer a job offer.")
    ] = DispatchSettings.availability_timeout,
    start_timeout: Annotated[
        float,
        typer.Option(
            help="Seconds a worker has to start a job it accepted; then the next gets it."
        ),
    ] = DispatchSettings.start_timeout,
    queue_timeout: Annotated[
        float, typer.Option(help="Seconds a job waits for a worker before it fails.")
    ] = DispatchSettings.queue_timeout,
    queue_limit: Annotated[
        int, typer.Option(help="Jobs that may wait for a worker; past it dispatches are refused.")
    ] = DispatchSettings.queue_limit,
    queue_limit_per_room: Annotated[
        int, typer.Option(min=1, help="Jobs that may wait for a worker in one room.")
    ] = DispatchSettings.queue_limit_per_room,
    queue_limit_per_agent: Annotated[
        int | None,
        typer.Option(
            min=1, help="Jobs that may wait for one agent's workers (default: half --queue-limit)."
        ),
    ] = DispatchSettings.queue_limit_per_agent,
    worker_silence_timeout: Annotated[
        float, typer.Option(help="Seconds without a frame after which a worker is dead.")
    ] = DispatchSettings.worker_silence_timeout,
    redispatch_grace: Annotated[
        float,
        typer.Option(
            help="Seconds a worker whose connection dropped mid-session has to reconnect and "
            "claim its sessions before they go to another worker (JRP_ON_FAILURE)."
        ),
    ] = DispatchSettings.redispatch_grace,
    ready_file: Annotated[
        Path | None, typer.Option(help="Write {url, pid} as JSON here once listening.")
    ] = None,
    keep_instances: Annotated[
        bool,
        typer.Option(help="Leave agent instances running when the server stops (re-adopted)."),
    ] = True,
    keep_warm: Annotated[
        float,
        typer.Option(help="Seconds a replaced version's idle instances stay up for rollback."),
    ] = Settings.keep_warm,
    runtime: Annotated[
        RuntimeKind,
        typer.Option(
            envvar="VF_RUNTIME",
            help="Where instances run: child processes of the server, or pods.",
        ),
    ] = RuntimeKind.LOCAL,
    kube_namespace: Annotated[
        str | None,
        typer.Option(
            envvar="VF_KUBE_NAMESPACE",
            help="Namespace of the instances' pods (default: the kubeconfig context's, or the "
            "server pod's own).",
        ),
    ] = None,
    kubeconfig: Annotated[
        Path | None,
        typer.Option(
            envvar="VF_KUBECONFIG",
            help="Kubeconfig for --runtime kubernetes (default: in-cluster service account, "
            "else $KUBECONFIG or ~/.kube/config).",
        ),
    ] = None,
    registry: Annotated[
        str,
        typer.Option(
            envvar="VF_REGISTRY",
            help="--runtime kubernetes: where `vf agent deploy` pushes the images it builds, "
            "HOST:PORT/PREFIX, port and prefix optional (e.g. registry.example.com/voicefleet); "
            "the cluster's nodes pull from there. None: only prebuilt images (deploy --image).",
        ),
    ] = "",
    registry_insecure: Annotated[
        bool,
        typer.Option(
            envvar="VF_REGISTRY_INSECURE",
            help="Push over plain HTTP, or HTTPS without verifying the registry's certificate.",
        ),
    ] = False,
    registry_authfile: Annotated[
        Path | None,
        typer.Option(
            envvar="VF_REGISTRY_AUTHFILE",
            help="The registry's credentials for pushes (containers-auth.json or Docker's "
            "config.json, as `buildah login --authfile` writes it).",
        ),
    ] = None,
    image_base: Annotated[
        str | None,
        typer.Option(
            envvar="VF_IMAGE_BASE",
            help="Base image of the images built (the BASE_IMAGE build argument of voicefleet's "
            "Dockerfiles; default python:3.11-slim, node:20-slim).",
        ),
    ] = None,
    image_build_ca: Annotated[
        Path | None,
        typer.Option(
            envvar="VF_IMAGE_BUILD_CA",
            help="A CA bundle the image builds' RUN steps trust in place of the system's (a "
            "TLS-inspecting proxy on the way to PyPI or npm); in no layer of the image.",
        ),
    ] = None,
    instance_url: Annotated[
        str,
        typer.Option(
            envvar="VF_INSTANCE_URL",
            help="Where instances reach this server, ws://HOST:PORT (their LIVEKIT_URL); in a "
            "cluster, its Service's name. Default: the address it listens on.",
        ),
    ] = "",
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    ssl_certfile: Annotated[
        Path | None,
        typer.Option(
            envvar="VF_SSL_CERTFILE",
            help="PEM certificate chain to serve TLS with: workers connect with wss://, "
            "clients with https:// (needs --ssl-keyfile).",
        ),
    ] = None,
    ssl_keyfile: Annotated[
        Path | None,
        typer.Option(envvar="VF_SSL_KEYFILE", help="The certificate's PEM private key."),
    ] = None,
) -> None:
    """Run the voicefleet server: LiveKit agent workers connect to it at ws://HOST:PORT
    (wss:// with --ssl-certfile/--ssl-keyfile)."""
    if ctx.invoked_subcommand is not None:
        return
    from voicefleet.control.tls import check_tls
    from voicefleet.store.db import check_store
    from voicefleet.store.secrets import check_secrets_key

    logs.setup(log_level)
    settings = Settings(
        # Absolute from here down: builds and instances run in other folders, where a path
        # relative to where `vf server` was started would point somewhere else.
        data_dir=_absolute(data_dir),
        env_cache=_absolute(env_cache) if env_cache else None,
        host=host,
        port=port,
        dev=dev,
        log_level=log_level,
        ready_file=_absolute(ready_file) if ready_file else None,
        keep_instances=keep_instances,
        keep_warm=keep_warm,
        database=database_url,
        ssl_certfile=_absolute(ssl_certfile) if ssl_certfile else None,
        ssl_keyfile=_absolute(ssl_keyfile) if ssl_keyfile else None,
        livekit_url=livekit_url,
        livekit_api_key=livekit_api_key,
        livekit_api_secret=livekit_api_secret,
        runtime=runtime,
        kubernetes=KubernetesSettings(
            kubeconfig=_absolute(kubeconfig) if kubeconfig else None, namespace=kube_namespace
        ),
        images=ImageSettings(
            registry=registry.rstrip("/"),
            insecure=registry_insecure,
            authfile=_absolute(registry_authfile) if registry_authfile else None,
            base=image_base or None,
            build_ca=_absolute(image_build_ca) if image_build_ca else None,
        ),
        instance_url=instance_url.rstrip("/"),
        dispatch=DispatchSettings(
            availability_timeout=availability_timeout,
            start_timeout=start_timeout,
            queue_timeout=queue_timeout,
            queue_limit=queue_limit,
            queue_limit_per_room=queue_limit_per_room,
            queue_limit_per_agent=queue_limit_per_agent,
            worker_silence_timeout=worker_silence_timeout,
            redispatch_grace=redispatch_grace,
            auto_dispatch=tuple(auto_dispatch or ()),
        ),
    )
    # Checked before serving: a failure inside the server's start-up is a page of traceback
    # from uvicorn; here it is one line saying where, and a hint.
    try:
        _check_images(settings)
        check_data_dir(settings.data_dir)
        check_tls(settings.ssl_certfile, settings.ssl_keyfile)
        asyncio.run(check_store(settings.database_url))
        asyncio.run(check_secrets_key(settings.database_url, settings.data_dir))
        if settings.runtime == RuntimeKind.KUBERNETES:
            asyncio.run(_check_kubernetes(settings.kubernetes))
        project, created = load_project(settings)
    except CannotStart as e:
        err.print(f"[red]error:[/red] {escape(str(e))}\nhint: {escape(e.hint)}")
        raise typer.Exit(2) from None
    except VoicefleetError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(2) from None
    if created:
        err.print(
            f"Created project '{project.name}'. Its credentials are shown once and kept in "
            f"{settings.data_dir / 'credentials.json'} (mode 0600):\n"
            f"  LIVEKIT_API_KEY={project.api_key}\n  LIVEKIT_API_SECRET={project.api_secret}"
        )
    from voicefleet.server import serve  # after the checks: a failed start says so at once

    asyncio.run(serve(settings, project))


async def _check_kubernetes(kube: KubernetesSettings) -> None:
    """The API server answers and lets the server do what the runtime does (else one line)."""
    from voicefleet.runtime.kubernetes import check_access, connect

    client = connect(kube.kubeconfig, kube.namespace)
    try:
        await check_access(client)
    finally:
        await client.close()


def _check_images(settings: Settings) -> None:
    images = settings.images
    if settings.runtime != RuntimeKind.KUBERNETES:
        if images.registry:
            raise CannotStart(
                "--registry is for images, which only the Kubernetes runtime runs",
                "--runtime local",
                "add --runtime kubernetes, or leave --registry out",
            )
        return
    if images.registry:
        host, _, _ = images.registry.partition("/")
        try:
            check_reference(f"{images.registry}/agent")
        except ValueError:
            host = ""
        if not ("." in host or ":" in host or host == "localhost"):
            raise CannotStart(
                f"--registry '{images.registry}' does not start with a registry's host",
                "--registry",
                "give HOST[:PORT][/PREFIX], e.g. registry.example.com/voicefleet or localhost:5001",
            )
    for flag, path in (
        ("--registry-authfile", images.authfile),
        ("--image-build-ca", images.build_ca),
    ):
        if path is not None and not path.is_file():
            raise CannotStart(f"{flag} {path} is not a file", flag, "give a readable file")
    if settings.instance_url and not settings.instance_url.startswith(("ws://", "wss://")):
        raise CannotStart(
            f"--instance-url '{settings.instance_url}' is not a ws:// or wss:// URL",
            "--instance-url",
            "e.g. ws://voicefleet.voicefleet.svc.cluster.local:7880",
        )


def _absolute(path: Path) -> Path:
    return path.expanduser().resolve()


@app.command()
def demo(
    agent: Annotated[
        Path | None,
        typer.Option(help="The agent folder to deploy [default: the example voice agent]."),
    ] = None,
    replicas: Annotated[int, typer.Option(min=1, help="Instances to run.")] = 2,
    sessions: Annotated[int, typer.Option(min=1, help="Sessions to dispatch.")] = 6,
    seconds: Annotated[float, typer.Option(min=0, help="Length of each session.")] = 8.0,
) -> None:
    """Start the embedded server, deploy the example agent, serve sessions, deploy again."""
    from voicefleet.cli.demo import DemoError, run_demo
    from voicefleet.cli.examples import NoExample, example

    logs.setup("warning")
    try:
        run_demo(agent or example("voice_agent"), replicas, sessions, seconds)
    except (DemoError, NoExample) as e:
        err.print(f"[red]demo failed:[/red] {e}")
        raise typer.Exit(1) from None


def main() -> None:
    app()
