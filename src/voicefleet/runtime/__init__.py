"""Where instances run: the `Runtime` protocol and its data; `local` runs child processes,
`kubernetes` runs pods; `base` is what both share (the instances followed, status changes told
to the listeners)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol


class InstanceStatus(StrEnum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


SECRETS_ENV = "VOICEFLEET_SECRETS_DIR"
SECRETS_MOUNT = "/etc/secrets"  # in a pod; where LiveKit Cloud puts mounted secrets too


@dataclass(frozen=True)
class InstanceSpec:
    instance_id: str
    agent_id: str
    version: str
    workdir: Path
    python: Path
    env: dict[str, str] = field(repr=False)
    log_dir: Path
    entry: str = "agent.py"
    grace_period: float = 3600.0
    deployment: str = ""
    # The container image a version runs as (the Kubernetes runtime; the local one ignores it).
    image: str = ""
    # A Node.js agent's command, `(node, entry, "start")`, run in place of the Python launcher
    # (the local runtime adds the health port); None for a Python agent.
    command: tuple[str, ...] | None = None
    # File secrets (`--secret-mount`): file name -> content. The local runtime writes them into
    # `secrets_dir` (0700, files 0600) before the process starts and removes it once the
    # instance stops; the Kubernetes runtime mounts them at SECRETS_MOUNT. Either way the
    # instance finds the directory in $VOICEFLEET_SECRETS_DIR.
    files: dict[str, bytes] = field(default_factory=dict, repr=False)
    secrets_dir: Path | None = None


@dataclass
class InstanceState:
    spec: InstanceSpec
    status: InstanceStatus = InstanceStatus.STARTING
    pid: int = 0
    started_at: float = 0.0
    health_port: int = 0
    restarts: int = 0
    last_exit: int | None = None

    @property
    def log_path(self) -> Path:
        return self.spec.log_dir / f"{self.spec.instance_id}.log"


ChangeListener = Callable[[str, InstanceStatus], None]


class Runtime(Protocol):
    def on_change(self, listener: ChangeListener) -> None: ...
    async def start(self, spec: InstanceSpec) -> InstanceState: ...
    async def drain(
        self, instance_id: str, grace: float | None = None, signalled: bool = False
    ) -> None: ...
    async def stop(self, instance_id: str) -> None: ...
    async def adopt(
        self, spec: InstanceSpec, pid: int, started_at: float
    ) -> InstanceState | None: ...
    def get(self, instance_id: str) -> InstanceState | None: ...
    async def close(self, leave_running: bool) -> None: ...
