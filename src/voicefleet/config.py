"""Every setting of a voicefleet server, validated once at start and passed down."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path


@dataclass(frozen=True)
class Project:
    """One environment: the credentials workers and API callers sign with, and its LiveKit SFU.

    Room tokens in job assignments are signed with the SFU's key so that the SFU accepts them;
    without an SFU configured they are signed with the project's own key.
    """

    name: str
    api_key: str
    api_secret: str
    livekit_url: str = ""
    livekit_api_key: str = ""
    livekit_api_secret: str = ""

    @property
    def room_token_key(self) -> tuple[str, str]:
        if self.livekit_api_key and self.livekit_api_secret:
            return self.livekit_api_key, self.livekit_api_secret
        return self.api_key, self.api_secret


@dataclass(frozen=True)
class DispatchSettings:
    # The Go server's AssignJobTimeout: how long a worker has to answer an availability request.
    availability_timeout: float = 10.0
    # The Go server's RegisterTimeout: how long a new connection has to send `register`.
    register_timeout: float = 10.0
    # A job a worker accepted but did not report started (JS_RUNNING) this long after its
    # assignment goes to the next worker. livekit-agents drops an assignment that reaches it
    # more than 7.5 s after it accepted; the Go server leaves such a job assigned forever.
    start_timeout: float = 30.0
    # A job no worker can take waits this long in the queue, then fails with a reason.
    queue_timeout: float = 60.0
    # A job every available worker refused is offered again after this long.
    retry_interval: float = 0.25
    # Jobs waiting for a worker, all agents together; past this CreateDispatch is refused.
    queue_limit: int = 10_000
    # Jobs waiting for a worker in one room. A room rarely needs more than a handful of agents
    # at once, and a token scoped to one room may dispatch into it at will: without this one
    # caller could fill the whole queue and every other room would be refused.
    queue_limit_per_room: int = 100
    # Jobs waiting for one agent name; None: half of `queue_limit`, so that one agent whose
    # workers are all busy or gone cannot take the whole queue from the others.
    queue_limit_per_agent: int | None = None
    # A worker whose connection drops mid-session has this long to reconnect and say it still
    # runs its jobs (livekit-agents reconnects at once); then they go to another worker
    # (LiveKit's JRP_ON_FAILURE), or fail if dispatched with JRP_NEVER. A local instance whose
    # process ended does not get it: its jobs move on as soon as the exit is seen.
    redispatch_grace: float = 3.0
    # A worker that sends nothing (workers report status every 2.5 s) for this long is dead.
    worker_silence_timeout: float = 30.0
    # Agents dispatched to every room a LiveKit `room_started` webhook announces.
    auto_dispatch: tuple[str, ...] = ()
    # Finished jobs kept in memory for ListDispatch; older ones live only in the store.
    finished_jobs_in_memory: int = 10_000

    @property
    def agent_queue_limit(self) -> int:
        if self.queue_limit_per_agent is not None:
            return self.queue_limit_per_agent
        return max(1, self.queue_limit // 2)


@dataclass(frozen=True)
class GatewaySettings:
    """Gateway mode: voicefleet registered with a LiveKit server as its worker."""

    # A job LiveKit offers is answered within this: taken by a worker here, or refused. LiveKit
    # v1.13's own wait is shorter than its AssignJobTimeout (10 s): the JobRequest RPC that
    # carries the offer expires after psrpc's default 3 s, and the offer with it.
    answer_within: float = 2.0
    # After a worker here accepted: how long LiveKit's assignment may take (it is sent at once).
    assignment_within: float = 5.0
    # The aggregate load and status are sent on every change, and at least this often.
    status_interval: float = 2.5
    # Reconnection: first delay, doubled each failed attempt up to the last.
    retry_first: float = 0.5
    retry_max: float = 30.0
    # A connection that does not open, or a register that is not answered, within this fails.
    connect_timeout: float = 10.0


class RuntimeKind(StrEnum):
    """Where instances run: child processes of the server, or pods."""

    LOCAL = "local"
    KUBERNETES = "kubernetes"


@dataclass(frozen=True)
class KubernetesSettings:
    # None: the pod's service account in a cluster, else $KUBECONFIG or ~/.kube/config.
    kubeconfig: Path | None = None
    # None: the kubeconfig context's namespace (or the server pod's own; else "default").
    namespace: str | None = None


@dataclass(frozen=True)
class ImageSettings:
    """How the Kubernetes runtime gets a version's image: built from the uploaded folder with
    buildah, tagged by the version's source digest and pushed to `registry`."""

    # host[:port][/prefix], e.g. registry.example.com/voicefleet; empty: no builds (only
    # `vf agent deploy --image`).
    registry: str = ""
    # Push over plain HTTP, or HTTPS without verifying the registry's certificate.
    insecure: bool = False
    # Credentials for the push (containers-auth.json, or Docker's config.json).
    authfile: Path | None = None
    # The BASE_IMAGE build argument (voicefleet's Dockerfiles' FROM); None: their default.
    base: str | None = None
    # A CA bundle mounted over the system's in every RUN step (a TLS-inspecting proxy).
    build_ca: Path | None = None


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 7880
    dev: bool = False
    log_level: str = "info"
    ready_file: Path | None = None
    # Instances keep running when the server stops, and are adopted by the next start, so a
    # server restart hangs up on nobody. False: stop them with the server (demo, tests).
    keep_instances: bool = True
    # A version replaced by a deploy keeps its idle instances running this long, so that a
    # rollback takes them back at once instead of starting new ones.
    keep_warm: float = 60.0
    # WebSocket-level keepalive: a worker that stops answering pings is disconnected.
    ws_ping_interval: float = 10.0
    ws_ping_timeout: float = 10.0
    livekit_url: str = ""
    livekit_api_key: str = ""
    livekit_api_secret: str = ""
    dispatch: DispatchSettings = field(default_factory=DispatchSettings)
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    runtime: RuntimeKind = RuntimeKind.LOCAL
    kubernetes: KubernetesSettings = field(default_factory=KubernetesSettings)
    images: ImageSettings = field(default_factory=ImageSettings)
    # Where instances reach this server (ws://…): LIVEKIT_URL of every instance. Empty: the
    # address it listens on, which pods in a cluster cannot use when it is a loopback one.
    instance_url: str = ""

    # SQLAlchemy URL of the store; empty: SQLite in the data directory.
    database: str = ""
    # Built environments (one per dependency digest); None: envs/ in the data directory.
    env_cache: Path | None = None
    # TLS (voicefleet.control.tls): the PEM certificate chain and key uvicorn serves; None:
    # plain HTTP. Workers connect with wss://, API clients with https://.
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None

    @property
    def tls(self) -> bool:
        return self.ssl_certfile is not None

    @property
    def database_url(self) -> str:
        return self.database or f"sqlite+aiosqlite:///{self.data_dir / 'voicefleet.db'}"
