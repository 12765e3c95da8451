"""The part of a kubelet kwok does not play: running the pod's process.

kwok marks voicefleet's pods Running and Ready and runs nothing. `PodPlayer` watches them and,
for each pod kwok reports Running, runs the agent as a local process with exactly the pod's
environment: its inline values and the values of the instance's Secret that its env refers
to (read back from the API, as a kubelet resolves secretKeyRef). So the workers that register
with the server do so with the credentials and settings the pods carry, and a rollout over the
Kubernetes runtime completes as it would on real nodes. A deleted pod's first process gets SIGTERM,
once (its grace is the pod's own: the kubelet's SIGKILL is not played). The image is not run: the
process runs `agent` (the same code the image was built from) with this machine's Python.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightkube import ApiError, AsyncClient
from lightkube.resources.core_v1 import Pod, Secret

from tests.kube import Cluster, admin, free_ports
from tests.support import with_us

LAUNCHER = Path(__file__).resolve().parent.parent / "src" / "voicefleet" / "runtime" / "launch.py"
# Any: lightkube's watch takes a dict of selector values (str, operators, iterables).
MANAGED: dict[str, Any] = {"app.kubernetes.io/managed-by": "voicefleet"}


@dataclass
class PlayedPod:
    name: str
    uid: str
    image: str
    labels: dict[str, str]
    env: dict[str, str] = field(repr=False)
    proc: asyncio.subprocess.Process | None = None
    terminated: bool = False  # had its SIGTERM


class PodPlayer:
    def __init__(self, kube: Cluster, namespace: str, agent: Path, log_dir: Path) -> None:
        self.kube, self.namespace = kube, namespace
        self.agent, self.log_dir = agent, log_dir
        self.pods: dict[str, PlayedPod] = {}  # every pod seen, by uid
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> PodPlayer:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for pod in self.pods.values():
            await self._stop(pod, signal.SIGKILL)

    def seen(self, **labels: str) -> list[PlayedPod]:
        """Pods seen with these labels (voicefleet.io/<key>), in the order they appeared."""
        return [
            p
            for p in self.pods.values()
            if all(p.labels.get(f"voicefleet.io/{k}") == v for k, v in labels.items())
        ]

    async def _run(self) -> None:
        async with admin(self.kube, self.namespace) as client:
            async for op, pod in client.watch(Pod, namespace=self.namespace, labels=MANAGED):
                meta = pod.metadata
                if meta is None or meta.uid is None or meta.name is None:
                    continue
                played = self.pods.get(meta.uid)
                if op == "DELETED" or meta.deletionTimestamp is not None:
                    if played is not None:
                        await self._stop(played, signal.SIGTERM)
                    continue
                if played is None:
                    assert pod.spec is not None
                    (container,) = pod.spec.containers
                    played = PlayedPod(
                        meta.name, meta.uid, container.image or "", dict(meta.labels or {}), {}
                    )
                    self.pods[meta.uid] = played
                running = pod.status is not None and pod.status.phase == "Running"
                if running and played.proc is None:
                    played.env = await self._env(client, pod)
                    await self._start(played)

    async def _env(self, client: AsyncClient, pod: Pod) -> dict[str, str]:
        assert pod.spec is not None
        env: dict[str, str] = {}
        secrets: dict[str, dict[str, str]] = {}
        for var in pod.spec.containers[0].env or []:
            if var.value is not None:
                env[var.name] = var.value
                continue
            ref = var.valueFrom.secretKeyRef if var.valueFrom else None
            if ref is None or ref.name is None:
                continue
            if ref.name not in secrets:
                try:
                    secret = await client.get(Secret, ref.name, namespace=self.namespace)
                except ApiError:
                    secrets[ref.name] = {}
                else:
                    secrets[ref.name] = {
                        k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()
                    }
            if ref.key in secrets[ref.name]:
                env[var.name] = secrets[ref.name][ref.key]
        return env

    async def _start(self, pod: PlayedPod) -> None:
        (port,) = free_ports(1)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{pod.name}.log", "ab") as out:
            pod.proc = await asyncio.create_subprocess_exec(
                *with_us([sys.executable, str(LAUNCHER), "--port", str(port), "agent.py", "start"]),
                cwd=self.agent,
                env={"PATH": os.environ.get("PATH", ""), **pod.env},
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    async def _stop(self, pod: PlayedPod, sig: signal.Signals) -> None:
        """SIGTERM as a container runtime sends it: once, to the container's first process
        only (the watch reports a terminating pod many times; a second SIGTERM would make
        livekit-agents exit at once, and its job processes are left to it). SIGKILL: all."""
        proc = pod.proc
        if proc is None or proc.returncode is not None:
            return
        if sig == signal.SIGTERM:
            if pod.terminated:
                return
            pod.terminated = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        if sig == signal.SIGKILL:
            await proc.wait()
