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
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from voicefleet.autoscale.policy import InstanceSignal
from voicefleet.control.secrets import SecretBox
from voicefleet.dispatch.registry import Worker
from voicefleet.dispatch.service import DispatchService
from voicefleet.errors import NotFound
from voicefleet.protocol.tokens import WorkerIdentity, instance_credentials
from voicefleet.rollout.rolling import RolloutFailed
from voicefleet.runtime import InstanceSpec, InstanceStatus, Runtime
from voicefleet.runtime.joblogs import JobLogs
from voicefleet.store.models import AgentRow, InstanceRow
from voicefleet.store.repo import Repo

if TYPE_CHECKING:
    from voicefleet.control.service import Paths

log = logging.getLogger("voicefleet.control")

LIVE = ("starting", "ready", "failed")  # instances that count towards a deployment's size
RETIRING = "retiring"


class Instances:
    def __init__(
        self,
        repo: Repo,
        dispatch: DispatchService,
        runtime: Runtime,
        box: SecretBox,
        paths: Paths,
        worker_url: Callable[[], str],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        serving_timeout: float = 180.0,
        keep_warm: float = 60.0,
    ) -> None:
        self.repo = repo
        self.dispatch = dispatch
        self.runtime = runtime
        self.box = box
        self.paths = paths
        self.worker_url = worker_url
        self.serving_timeout = serving_timeout
        self.keep_warm = keep_warm
        self._spawn = spawn
        # What each session logged at ERROR, for the per-version stats that judge versions.
        self.joblogs = JobLogs(dispatch.stats.log_errors)
        runtime.on_change(self._changed)

    def http_url(self) -> str:
        """The server's own address for instances' HTTP calls (flags, smoke commands)."""
        return self.worker_url().replace("ws", "http", 1)

    # -- what the dispatcher sees -------------------------------------------------------------

    def workers(self, instance_id: str) -> Iterator[Worker]:
        return (
            w for w in self.dispatch.registry.workers.values() if w.identity.instance == instance_id
        )

    def registered(self, instance_id: str) -> bool:
        return any(True for _ in self.workers(instance_id))

    def sessions(self, instance_id: str) -> int:
        return sum(len(w.jobs) for w in self.workers(instance_id))

    def restarts(self, instance_ids: list[str]) -> int:
        return sum(s.restarts for i in instance_ids if (s := self.runtime.get(i)))

    def signals(self, rows: list[InstanceRow]) -> list[InstanceSignal]:
        """What the dispatcher sees of each instance now: its worker's load and sessions."""
        workers = {w.identity.instance: w for w in self.dispatch.registry.workers.values()}
        out = []
        for row in rows:
            w = workers.get(row.id)
            out.append(
                InstanceSignal(row.id, w.load, len(w.jobs), True)
                if w is not None and w.connected
                else InstanceSignal(row.id, registered=False)
            )
        return out

    def warm(self, instance_id: str) -> bool:
        """Running, healthy and registered: it can take sessions again the moment it is routed."""
        state = self.runtime.get(instance_id)
        return (
            state is not None
            and state.status == InstanceStatus.READY
            # Connected and not draining; FULL is passing and does not count against it.
            and any(w.connected and not w.draining for w in self.workers(instance_id))
        )

    async def live(self, agent_id: str) -> list[InstanceRow]:
        return await self.repo.instances(agent_id, LIVE)

    # -- starting and serving -----------------------------------------------------------------

    async def ensure(
        self, agent: AgentRow, deployment: str, version: str, fresh_since: float | None, want: int
    ) -> list[str]:
        """`want` live instances of `version`: the ones there are, warm retired ones taken
        back, new ones started."""
        of_version = [
            r
            for r in await self.repo.instances(agent.id, [*LIVE, RETIRING])
            if r.deployment == deployment and r.version == version
        ]
        rows = [
            r
            for r in of_version
            if (fresh_since is None or r.created_at >= fresh_since)
            and (r.status != RETIRING or self.warm(r.id))
        ][: max(want, 1)]
        for row in (r for r in of_version if r.status == RETIRING):
            if row in rows:  # a rollback: take the warm instance back
                await self.repo.set_instance_status(row.id, "ready")
                log.info("retired instance taken back", extra={"instance": row.id})
            else:  # once its version is routed again, only routing would keep sessions off it
                await self.drain(row, agent.grace_period)
        while len(rows) < want:
            rows.append(await self.start(agent, deployment, version))
        return [r.id for r in rows]

    async def start(self, agent: AgentRow, deployment: str, version: str) -> InstanceRow:
        instance_id = f"{agent.name[:20]}-{version}-{secrets.token_hex(6)}"
        now = time.time()
        row = InstanceRow(
            id=instance_id,
            agent_id=agent.id,
            deployment=deployment,
            version=version,
            status="starting",
            created_at=now,
            updated_at=now,
        )
        await self.repo.save(row)  # in the store before it exists: a restart finds it
        state = await self.runtime.start(await self._spec(agent, deployment, version, instance_id))
        self.joblogs.follow(instance_id, state.log_path, agent.name, version)
        row.pid, row.pid_started_at = state.pid or 0, state.started_at or 0.0
        await self.repo.save(row)
        log.info("instance started", extra={"instance": instance_id, "pid": row.pid})
        return row

    async def wait_serving(self, instance_ids: list[str]) -> None:
        """Until each instance is healthy and its worker registered; a crash or the
        serving timeout fails the rollout waiting on them."""
        deadline = time.monotonic() + self.serving_timeout
        pending = set(instance_ids)
        # A crash now fails the rollout; restarts an instance had before (a warm one) do not.
        restarts = {i: s.restarts for i in instance_ids if (s := self.runtime.get(i))}
        while pending:
            for instance_id in list(pending):
                state = self.runtime.get(instance_id)
                if state is None or state.restarts > restarts.get(instance_id, 0):
                    exit_info = f" (last exit: {state.last_exit})" if state else ""
                    raise RolloutFailed(f"instance {instance_id} crashed while starting{exit_info}")
                if self.registered(instance_id) and state.status == InstanceStatus.READY:
                    pending.discard(instance_id)
            if time.monotonic() > deadline:
                raise RolloutFailed(
                    f"instances {sorted(pending)} not serving after {self.serving_timeout:g}s"
                )
            await asyncio.sleep(0.1)

    async def _spec(
        self, agent: AgentRow, deployment: str, version: str, instance_id: str
    ) -> InstanceSpec:
        row = await self.repo.version(agent.id, version)
        if row is None:
            raise NotFound(f"agent {agent.name} has no version '{version}'")
        project = self.dispatch.project
        identity = WorkerIdentity(agent=agent.id, version=row.version, instance=instance_id)
        key, secret = instance_credentials(project.api_secret, identity)
        env = {s.name: self.box.open_value(s.value) for s in await self.repo.secrets(agent.id)}
        env.update(
            LIVEKIT_URL=self.worker_url(),
            VOICEFLEET_URL=self.http_url(),
            PYTHONPATH=str(self.paths.sdk),
            LIVEKIT_API_KEY=key,
            LIVEKIT_API_SECRET=secret,
            LIVEKIT_AGENT_DEPLOYMENT=deployment,
            LIVEKIT_AGENT_NAME_OVERRIDE=agent.name,
            VOICEFLEET_AGENT_ID=agent.id,
            VOICEFLEET_VERSION=row.version,
            VOICEFLEET_INSTANCE_ID=instance_id,
            VOICEFLEET_GRACE_PERIOD=str(int(agent.grace_period)),
            VOICEFLEET_FLAGS_CACHE=str(self.paths.flags_cache(agent.id)),
        )
        return InstanceSpec(
            instance_id=instance_id,
            agent_id=agent.id,
            version=row.version,
            workdir=self.paths.source(agent.id, row.version),
            python=Path(row.python),
            env=env,
            log_dir=self.paths.instance_logs(agent.id),
            grace_period=agent.grace_period,
        )

    # -- retiring, draining, stopping ---------------------------------------------------------

    async def drain(self, row: InstanceRow, grace: float) -> None:
        # The dispatcher stops offering jobs first; then the process gets SIGTERM.
        for worker in list(self.workers(row.id)):
            self.dispatch.registry.drain(worker)
        await self.repo.set_instance_status(row.id, "draining")
        await self.runtime.drain(row.id, grace)

    async def drain_ids(self, instance_ids: list[str]) -> None:
        for row in await self.repo.instances(statuses=[*LIVE, RETIRING]):
            if row.id in instance_ids:
                agent = await self.repo.agent(row.agent_id)
                await self.drain(row, agent.grace_period if agent else 0.0)

    async def retire_others(
        self, agent: AgentRow, deployment: str, serving: str, keep: list[str], warm: bool
    ) -> list[str]:
        """Instances of `deployment` other than `keep` stop taking sessions. Other versions'
        retire (kept warm for a rollback) or, with `warm=False`, drain now."""
        drained = []
        for row in await self.repo.instances(agent.id, LIVE):
            if row.deployment != deployment or row.id in keep:
                continue
            if row.version == serving or not warm:
                # A restart: routing by version cannot tell these from their replacements.
                await self.drain(row, agent.grace_period)
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
                    await self.drain(row, max(0.0, grace - age))

    async def stop(self, instance_ids: list[str]) -> None:
        for instance_id in instance_ids:
            await self.runtime.stop(instance_id)
            await self.repo.set_instance_status(instance_id, "stopped")

    async def give_up(
        self, agent: AgentRow, serving: str, instance_ids: list[str], since: float
    ) -> None:
        """A rollout that failed before its shift lets go of the instances it gathered. Those it
        started (since `since`) stop, or drain if their version is the one serving (they may
        have sessions); retired ones it took back retire again; ones that were serving already
        go on serving. Nobody's session is cut."""
        for row in await self.repo.instances(agent.id, [*LIVE, RETIRING]):
            if row.id not in instance_ids:
                continue
            if row.created_at >= since:
                if row.version == serving:
                    await self.drain(row, agent.grace_period)
                else:
                    await self.stop([row.id])
            elif row.version != serving:
                await self.repo.set_instance_status(row.id, RETIRING)

    # -- after a server restart ---------------------------------------------------------------

    async def adopt_all(self) -> None:
        """Take back the instances the last run left: adopted when their process still runs,
        started again when it should be serving, forgotten when it was on its way out."""
        for row in await self.repo.instances(statuses=[*LIVE, RETIRING, "draining"]):
            try:
                await self._adopt_or_restart(row)
            except Exception:  # one instance that cannot start must not stop the server
                log.exception("instance not taken back", extra={"instance": row.id})
                await self.repo.set_instance_status(row.id, "failed")

    async def _adopt_or_restart(self, row: InstanceRow) -> None:
        agent = await self.repo.agent(row.agent_id)
        if agent is None:
            return
        spec = await self._spec(agent, row.deployment, row.version, row.id)
        state = await self.runtime.adopt(spec, row.pid, row.pid_started_at) if row.pid else None
        if state is not None:
            log.info("instance re-adopted", extra={"instance": row.id, "pid": row.pid})
            self.joblogs.follow(row.id, state.log_path, agent.name, row.version)
            if row.status == "draining":  # SIGTERMed before the restart: the rest of its grace
                left = max(0.0, agent.grace_period - (time.time() - row.updated_at))
                await self.runtime.drain(row.id, left, signalled=True)
            return
        if row.status in ("draining", RETIRING):
            await self.repo.set_instance_status(row.id, "stopped")
            return
        state = await self.runtime.start(spec)
        self.joblogs.follow(row.id, state.log_path, agent.name, row.version)
        await self.repo.set_instance_status(
            row.id, "starting", pid=state.pid or 0, pid_started_at=state.started_at or 0.0
        )
        log.info("instance restarted after server restart", extra={"instance": row.id})

    def _changed(self, instance_id: str, status: InstanceStatus) -> None:
        if status == InstanceStatus.STOPPED:
            self.joblogs.forget(instance_id)
        self._spawn(self._persist(instance_id, status))

    async def _persist(self, instance_id: str, status: InstanceStatus) -> None:
        state = self.runtime.get(instance_id)
        fields: dict[str, Any] = {}
        if state is not None and state.pid:
            fields = {"pid": state.pid, "pid_started_at": state.started_at or 0.0}
        # A retired instance that restarts after a crash stays retired: routing excludes it.
        unless = RETIRING if status != InstanceStatus.STOPPED else None
        await self.repo.set_instance_status(instance_id, str(status.value), unless=unless, **fields)
