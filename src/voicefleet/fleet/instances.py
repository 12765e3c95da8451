"""Instances: the running processes of versions, as the store records them and the dispatcher
sees them.

An instance is started with credentials of its own (the key names its worker) and the agent's
secrets; recorded in the store before its process exists, so a restarted server adopts it (by pid
and start time) or starts it again. Its life after serving:

  retiring  replaced by a newer version: no new sessions (routing), sessions in flight go on,
            process untouched. A rollback within `keep_warm` takes it back at once; past that,
            once idle (or at the end of the grace period), it drains.
  draining  the dispatcher offers it nothing; SIGTERM, so the worker finishes its sessions and
            exits; SIGKILL only at the end of the agent's grace period.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from voicefleet.build import node
from voicefleet.dispatch.service import DispatchService
from voicefleet.errors import NotFound, VoicefleetError
from voicefleet.fleet.paths import Paths
from voicefleet.protocol.tokens import WorkerIdentity, instance_credentials
from voicefleet.runtime import InstanceSpec, InstanceState, InstanceStatus, Runtime
from voicefleet.runtime.joblogs import JobLogs
from voicefleet.store.models import AgentRow, InstanceRow
from voicefleet.store.repo import Repo
from voicefleet.store.secrets import SecretBox

log = logging.getLogger("voicefleet.fleet")


class Lifecycle(StrEnum):
    """An instance's status as the store records it."""

    STARTING = "starting"
    READY = "ready"
    FAILED = "failed"
    RETIRING = "retiring"
    DRAINING = "draining"
    STOPPED = "stopped"


# Instances that count towards a deployment's size.
LIVE = (Lifecycle.STARTING, Lifecycle.READY, Lifecycle.FAILED)
RETIRING = Lifecycle.RETIRING


class NotServing(VoicefleetError):
    """Instances crashed while starting, or were not serving in time."""


@dataclass(frozen=True)
class Target:
    """Where the fleet acts: one deployment of one agent, resolved once by the caller."""

    agent_id: str
    agent_name: str
    deployment: str
    grace_period: float

    @classmethod
    def of(cls, agent: AgentRow, deployment: str) -> Target:
        return cls(agent.id, agent.name, deployment, agent.grace_period)


class Instances:
    def __init__(
        self,
        repo: Repo,
        dispatch: DispatchService,
        runtime: Runtime,
        box: SecretBox,
        paths: Paths,
        worker_url: Callable[[], str],
        serving_timeout: float = 180.0,
        keep_warm: float = 60.0,
        trust: dict[str, str] | None = None,
    ) -> None:
        self.repo = repo
        self.dispatch = dispatch
        self.runtime = runtime
        self.box = box
        self.paths = paths
        self.worker_url = worker_url
        self.serving_timeout = serving_timeout
        self.keep_warm = keep_warm
        # Variables every instance gets (the CA bundle that verifies the server's certificate);
        # the agent's own secrets may set them otherwise.
        self.trust = dict(trust or {})
        # Status changes being written to the store (the runtime reports them synchronously).
        self._writes: set[asyncio.Task[None]] = set()
        # What each session logged at ERROR, for the per-version stats that judge versions.
        self.joblogs = JobLogs(dispatch.log_errors)
        runtime.on_change(self._changed)

    async def close(self, leave_running: bool) -> None:
        """Stop following the instances; their processes go on unless `leave_running` is off."""
        for task in list(self._writes):
            task.cancel()
        await asyncio.gather(*self._writes, return_exceptions=True)
        await self.runtime.close(leave_running=leave_running)

    def http_url(self) -> str:
        """The server's own address for instances' HTTP calls (flags, smoke commands)."""
        return "http" + self.worker_url().removeprefix("ws")  # wss:// -> https://

    # -- what the dispatcher sees -------------------------------------------------------------

    def registered(self, instance_id: str) -> bool:
        return self.dispatch.instance(instance_id).registered

    def sessions(self, instance_id: str) -> int:
        return self.dispatch.instance(instance_id).sessions

    def restarts(self, instance_ids: list[str]) -> int:
        return sum(s.restarts for i in instance_ids if (s := self.runtime.get(i)))

    def state(self, instance_id: str) -> InstanceState | None:
        """The runtime's view of the instance (pid, restarts), if it runs here."""
        return self.runtime.get(instance_id)

    def poll_logs(self) -> None:
        """Read what the instances logged up to now (a smoke test's sessions just ended)."""
        self.joblogs.poll()

    def warm(self, instance_id: str) -> bool:
        """Running, healthy and registered: it can take sessions again the moment it is routed."""
        state = self.runtime.get(instance_id)
        return (
            state is not None
            and state.status == InstanceStatus.READY
            # Connected and not draining; FULL is passing and does not count against it.
            and self.dispatch.instance(instance_id).accepting
        )

    async def live(self, agent_id: str) -> list[InstanceRow]:
        return await self.repo.instances(agent_id, LIVE)

    # -- starting and serving -----------------------------------------------------------------

    async def ensure(
        self, target: Target, version: str, fresh_since: float | None, want: int
    ) -> list[str]:
        """`want` live instances of `version`: the ones there are, warm retired ones taken
        back, new ones started."""
        of_version = [
            r
            for r in await self.repo.instances(target.agent_id, [*LIVE, RETIRING])
            if r.deployment == target.deployment and r.version == version
        ]
        rows = [
            r
            for r in of_version
            if (fresh_since is None or r.created_at >= fresh_since)
            and (r.status != RETIRING or self.warm(r.id))
        ][: max(want, 1)]
        for row in (r for r in of_version if r.status == RETIRING):
            if row in rows:  # a rollback: take the warm instance back...
                if await self.repo.change_instance_status(row, Lifecycle.READY):
                    log.info("retired instance taken back", extra={"instance": row.id})
                else:  # ...unless the reaper drained it since it was read: start another
                    rows.remove(row)
            else:  # once its version is routed again, only routing would keep sessions off it
                await self.drain_row(row, target.grace_period)
        while len(rows) < want:
            rows.append(await self.start(target, version))
        return [r.id for r in rows]

    async def start(self, target: Target, version: str) -> InstanceRow:
        instance_id = f"{target.agent_name[:20]}-{version}-{secrets.token_hex(6)}"
        now = time.time()
        row = InstanceRow(
            id=instance_id,
            agent_id=target.agent_id,
            deployment=target.deployment,
            version=version,
            status=Lifecycle.STARTING,
            created_at=now,
            updated_at=now,
        )
        await self.repo.save(row)  # in the store before it exists: a restart finds it
        state = await self.runtime.start(await self._spec(target, version, instance_id))
        self.joblogs.follow(instance_id, state.log_path, target.agent_name, version)
        row.pid, row.pid_started_at = state.pid or 0, state.started_at or 0.0
        await self.repo.save(row)
        log.info("instance started", extra={"instance": instance_id, "pid": row.pid})
        return row

    async def wait_serving(self, instance_ids: list[str]) -> None:
        """Until each instance is healthy and its worker registered; a crash or the
        serving timeout raises NotServing (the caller decides what that means)."""
        clock = asyncio.get_running_loop().time  # the clock asyncio.sleep counts on
        deadline = clock() + self.serving_timeout
        pending = set(instance_ids)
        # A crash now fails the rollout; restarts an instance had before (a warm one) do not.
        restarts = {i: s.restarts for i in instance_ids if (s := self.runtime.get(i))}
        while pending:
            for instance_id in list(pending):
                state = self.runtime.get(instance_id)
                if state is None or state.restarts > restarts.get(instance_id, 0):
                    exit_info = f" (last exit: {state.last_exit})" if state else ""
                    raise NotServing(f"instance {instance_id} crashed while starting{exit_info}")
                if self.registered(instance_id) and state.status == InstanceStatus.READY:
                    pending.discard(instance_id)
            if clock() > deadline:
                raise NotServing(
                    f"instances {sorted(pending)} not serving after {self.serving_timeout:g}s"
                )
            await asyncio.sleep(0.1)

    async def _spec(self, target: Target, version: str, instance_id: str) -> InstanceSpec:
        agent_id, name = target.agent_id, target.agent_name
        row = await self.repo.version(agent_id, version)
        if row is None:
            raise NotFound(f"agent {name} has no version '{version}'")
        project = self.dispatch.project
        identity = WorkerIdentity(agent=agent_id, version=row.version, instance=instance_id)
        key, secret = instance_credentials(project.api_secret, identity)
        stored = await self.repo.secrets(agent_id)
        env = dict(self.trust)
        env.update((s.name, self.box.open_value(s.value)) for s in stored if s.kind != "file")
        files = {s.name: self.box.open_bytes(s.value) for s in stored if s.kind == "file"}
        env.update(
            LIVEKIT_URL=self.worker_url(),
            VOICEFLEET_URL=self.http_url(),
            PYTHONPATH=str(self.paths.sdk),
            LIVEKIT_API_KEY=key,
            LIVEKIT_API_SECRET=secret,
            LIVEKIT_AGENT_DEPLOYMENT=target.deployment,
            LIVEKIT_AGENT_NAME_OVERRIDE=name,
            VOICEFLEET_AGENT_ID=agent_id,
            VOICEFLEET_VERSION=row.version,
            VOICEFLEET_INSTANCE_ID=instance_id,
            VOICEFLEET_GRACE_PERIOD=str(int(target.grace_period)),
            VOICEFLEET_FLAGS_CACHE=str(self.paths.flags_cache(agent_id)),
        )
        workdir = self.paths.source(agent_id, row.version)
        command = None
        if node.is_node_agent(workdir):  # built by the Node.js builder: row.python is node
            command = (row.python, node.entry(workdir), "start")
        return InstanceSpec(
            instance_id=instance_id,
            agent_id=agent_id,
            version=row.version,
            workdir=workdir,
            python=Path(row.python),
            env=env,
            log_dir=self.paths.instance_logs(agent_id),
            grace_period=target.grace_period,
            deployment=target.deployment,
            image=row.image,
            command=command,
            files=files,
            secrets_dir=self.paths.instance_secrets(instance_id),
        )

    # -- retiring, draining, stopping ---------------------------------------------------------

    async def drain_row(self, row: InstanceRow, grace: float) -> None:
        # The dispatcher stops offering jobs first; then the process gets SIGTERM.
        self.dispatch.drain_instance(row.id)
        await self.repo.set_instance_status(row.id, Lifecycle.DRAINING)
        await self.runtime.drain(row.id, grace)

    async def drain(self, instance_ids: list[str]) -> None:
        for row in await self.repo.instances(statuses=[*LIVE, RETIRING]):
            if row.id in instance_ids:
                agent = await self.repo.agent(row.agent_id)
                await self.drain_row(row, agent.grace_period if agent else 0.0)

    async def retire_others(
        self, target: Target, serving: str, keep: list[str], warm: bool
    ) -> list[str]:
        """Instances of the target other than `keep` stop taking sessions. Other versions'
        retire (kept warm for a rollback) or, with `warm=False`, drain now."""
        drained = []
        for row in await self.repo.instances(target.agent_id, LIVE):
            if row.deployment != target.deployment or row.id in keep:
                continue
            if row.version == serving or not warm:
                # A restart: routing by version cannot tell these from their replacements.
                await self.drain_row(row, target.grace_period)
            else:
                await self.repo.set_instance_status(row.id, RETIRING)
            drained.append(row.id)
        return drained

    async def reap_retired(self, interval: float = 1.0) -> None:
        """Drain retired instances once idle past `keep_warm`, or at the end of the grace."""
        while True:
            await asyncio.sleep(interval)
            now = time.time()
            for row in await self.repo.instances(statuses=[RETIRING]):
                agent = await self.repo.agent(row.agent_id)
                grace = agent.grace_period if agent else 0.0
                age = now - row.updated_at
                if (self.sessions(row.id) == 0 and age >= self.keep_warm) or age >= grace:
                    # Only as it was read: a rollout that took it back since (`ensure`) keeps it.
                    if await self.repo.change_instance_status(row, Lifecycle.DRAINING):
                        self.dispatch.drain_instance(row.id)
                        await self.runtime.drain(row.id, max(0.0, grace - age))

    async def stop(self, instance_ids: list[str]) -> None:
        for instance_id in instance_ids:
            await self.runtime.stop(instance_id)
            await self.repo.set_instance_status(instance_id, Lifecycle.STOPPED)

    async def give_up(
        self, target: Target, serving: str, instance_ids: list[str], since: float
    ) -> None:
        """A rollout that failed before its shift lets go of the instances it gathered. Those it
        started (since `since`) stop, or drain if their version is the one serving (they may
        have sessions); retired ones it took back retire again; ones that were serving already
        go on serving. Nobody's session is cut."""
        for row in await self.repo.instances(target.agent_id, [*LIVE, RETIRING]):
            if row.id not in instance_ids:
                continue
            if row.created_at >= since:
                if row.version == serving:
                    await self.drain_row(row, target.grace_period)
                else:
                    await self.stop([row.id])
            elif row.version != serving:
                await self.repo.set_instance_status(row.id, RETIRING)

    # -- after a server restart ---------------------------------------------------------------

    async def adopt_all(self) -> None:
        """Take back the instances the last run left: adopted when their process still runs,
        started again when it should be serving, forgotten when it was on its way out."""
        for row in await self.repo.instances(statuses=[*LIVE, RETIRING, Lifecycle.DRAINING]):
            try:
                await self._adopt_or_restart(row)
            except Exception:  # one instance that cannot start must not stop the server
                log.exception("instance not taken back", extra={"instance": row.id})
                await self.repo.set_instance_status(row.id, Lifecycle.FAILED)

    async def _adopt_or_restart(self, row: InstanceRow) -> None:
        agent = await self.repo.agent(row.agent_id)
        if agent is None:
            return
        spec = await self._spec(Target.of(agent, row.deployment), row.version, row.id)
        # Asked even without a pid: a runtime may find its instance by id (a pod by its name).
        state = await self.runtime.adopt(spec, row.pid, row.pid_started_at)
        if state is not None:
            log.info("instance re-adopted", extra={"instance": row.id, "pid": row.pid})
            self.joblogs.follow(row.id, state.log_path, agent.name, row.version)
            if (
                row.status == Lifecycle.DRAINING
            ):  # SIGTERMed before the restart: the rest of its grace
                left = max(0.0, agent.grace_period - (time.time() - row.updated_at))
                await self.runtime.drain(row.id, left, signalled=True)
            return
        if row.status in (Lifecycle.DRAINING, RETIRING):
            await self.repo.set_instance_status(row.id, Lifecycle.STOPPED)
            return
        state = await self.runtime.start(spec)
        self.joblogs.follow(row.id, state.log_path, agent.name, row.version)
        await self.repo.set_instance_status(
            row.id, Lifecycle.STARTING, pid=state.pid or 0, pid_started_at=state.started_at or 0.0
        )
        log.info("instance restarted after server restart", extra={"instance": row.id})

    def _changed(self, instance_id: str, status: InstanceStatus) -> None:
        if status == InstanceStatus.FAILED:  # its process died: its sessions move on now
            self.dispatch.instance_exited(instance_id, redispatch=True)
        if status == InstanceStatus.STOPPED:
            # Ended by us (drained, stopped, or killed at the end of its grace period): what it
            # still ran ends with it, and is not started again elsewhere.
            self.dispatch.instance_exited(instance_id, redispatch=False)
            self.joblogs.forget(instance_id)
        task = asyncio.create_task(self._persist(instance_id, status))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _persist(self, instance_id: str, status: InstanceStatus) -> None:
        state = self.runtime.get(instance_id)
        fields: dict[str, Any] = {}
        if state is not None and state.pid:
            fields = {"pid": state.pid, "pid_started_at": state.started_at or 0.0}
        # A retired instance that restarts after a crash stays retired: routing excludes it.
        unless = RETIRING if status != InstanceStatus.STOPPED else None
        await self.repo.set_instance_status(instance_id, str(status.value), unless=unless, **fields)
