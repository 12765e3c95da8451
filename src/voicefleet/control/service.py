"""The control plane: agents, versions, deploys, rollbacks, secrets, instances.

It owns the store's rows and turns them into action through the builder (source -> version),
the runtime (version -> running instances) and the dispatcher's routing table (which version
takes new sessions). Rollout steps live in `voicefleet.rollout`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets as pysecrets
import shutil
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from voicefleet.build.bundle import extract_bundle
from voicefleet.build.local import LocalBuilder
from voicefleet.control.secrets import SecretBox
from voicefleet.dispatch.service import DispatchService
from voicefleet.errors import BuildFailed, InvalidRequest, NotFound, VoicefleetError
from voicefleet.protocol.tokens import WorkerIdentity, instance_credentials
from voicefleet.rollout.rolling import PROGRESSING, RolloutFailed, run_rolling
from voicefleet.runtime import InstanceSpec, InstanceStatus, Runtime
from voicefleet.store.models import (
    AgentRow,
    DeploymentRow,
    InstanceRow,
    RolloutRow,
    SecretRow,
    VersionRow,
)
from voicefleet.store.repo import Repo

log = logging.getLogger("voicefleet.control")

DEFAULT_DEPLOYMENT = "production"
LIVE = ("starting", "ready", "failed")  # instances that count towards a deployment's size
# Replaced by a newer version: no new sessions (routing), sessions in flight go on, process
# untouched. A rollback within `keep_warm` takes it back at once; past that, once idle (or at
# the end of the grace period), it drains: SIGTERM, then SIGKILL after the rest of the grace.
RETIRING = "retiring"
AGENT_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_")


def new_id(prefix: str) -> str:
    return prefix + pysecrets.token_hex(6)


@dataclass(frozen=True)
class Paths:
    data_dir: Path

    def version_dir(self, agent_id: str, version: str) -> Path:
        return self.data_dir / "agents" / agent_id / version

    def source(self, agent_id: str, version: str) -> Path:
        return self.version_dir(agent_id, version) / "src"

    def bundle(self, agent_id: str, version: str) -> Path:
        return self.version_dir(agent_id, version) / "bundle.tar.gz"

    def build_log(self, agent_id: str, version: str) -> Path:
        return self.version_dir(agent_id, version) / "build.log"

    @property
    def envs(self) -> Path:
        return self.data_dir / "envs"

    def instance_logs(self, agent_id: str) -> Path:
        return self.data_dir / "logs" / agent_id


class ControlPlane:
    def __init__(
        self,
        repo: Repo,
        dispatch: DispatchService,
        runtime: Runtime,
        builder: LocalBuilder,
        box: SecretBox,
        paths: Paths,
        worker_url: Callable[[], str],
        serving_timeout: float = 180.0,
        keep_warm: float = 60.0,
    ) -> None:
        self.repo = repo
        self.dispatch = dispatch
        self.runtime = runtime
        self.builder = builder
        self.box = box
        self.paths = paths
        self.worker_url = worker_url
        self.serving_timeout = serving_timeout
        self.keep_warm = keep_warm
        self._tasks: set[asyncio.Task[Any]] = set()
        self._agent_locks: dict[str, asyncio.Lock] = {}
        runtime.on_change(self._instance_changed)

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Take back what the last run left: instances, routes, unfinished rollouts and builds."""
        for dep in await self.repo.deployments():
            agent = await self.repo.agent(dep.agent_id)
            if agent is not None and dep.version:
                self.dispatch.routing.route(agent.name, {dep.version})
        for row in await self.repo.instances(statuses=[*LIVE, RETIRING, "draining"]):
            await self._adopt_or_restart(row)
        self._spawn(self._reap_retired())
        for rollout in await self.repo.rollouts(states=[PROGRESSING], limit=1000):
            log.info("resuming rollout", extra={"rollout": rollout.id, "step": rollout.step})
            self._spawn(self._run_rollout(rollout))
        for agent in await self.repo.agents():
            for v in await self.repo.versions(agent.id):
                if v.status == "building":
                    v.status, v.error = "failed", "the server restarted during the build"
                    await self.repo.save(v)

    async def close(self, leave_running: bool = True) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.runtime.close(leave_running=leave_running)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _lock(self, agent_id: str) -> asyncio.Lock:
        return self._agent_locks.setdefault(agent_id, asyncio.Lock())

    # -- agents -------------------------------------------------------------------------------

    async def create_agent(self, name: str, grace_period: float = 3600.0) -> AgentRow:
        if not name or set(name.lower()) - AGENT_NAME_CHARS or len(name) > 100:
            raise InvalidRequest(f"agent name '{name}' must be 1-100 letters, digits, '-' or '_'")
        if await self.repo.agent(name) is not None:
            raise InvalidRequest(f"an agent named '{name}' already exists")
        if grace_period < 0:
            raise InvalidRequest("grace period must be >= 0 seconds")
        now = time.time()
        agent = AgentRow(id=new_id("CA_"), name=name, grace_period=grace_period, created_at=now)
        deployment = DeploymentRow(
            agent_id=agent.id, name=DEFAULT_DEPLOYMENT, version="", replicas=1, updated_at=now
        )
        await self.repo.save(agent, deployment)
        await self.repo.event(agent.id, "agent_created", f"agent {name} created")
        return agent

    async def agent(self, key: str) -> AgentRow:
        agent = await self.repo.agent(key)
        if agent is None:
            raise NotFound(f"no agent '{key}'")
        return agent

    async def deployment(self, agent: AgentRow, name: str) -> DeploymentRow:
        dep = await self.repo.deployment(agent.id, name)
        if dep is None:
            dep = DeploymentRow(
                agent_id=agent.id, name=name, version="", replicas=1, updated_at=time.time()
            )
            await self.repo.save(dep)
        return dep

    async def configure(self, agent: AgentRow, *, grace_period: float | None = None) -> AgentRow:
        if grace_period is not None:
            if grace_period < 0:
                raise InvalidRequest("grace period must be >= 0 seconds")
            agent.grace_period = grace_period
        await self.repo.save(agent)
        return agent

    async def delete_agent(self, agent: AgentRow) -> None:
        """Stop routing to the agent and drain its instances; sessions in flight finish."""
        self.dispatch.routing.route(agent.name, set())
        for row in await self.repo.instances(agent.id, [*LIVE, RETIRING]):
            await self._drain(row, agent.grace_period)
        await self.repo.delete_agent(agent.id)
        await self.repo.event(agent.id, "agent_deleted", f"agent {agent.name} deleted")

    # -- versions -----------------------------------------------------------------------------

    async def upload(self, agent: AgentRow, bundle: Path, deployment: str) -> VersionRow:
        """Take a source bundle: a new immutable version, built in the background, then
        rolled out to `deployment`. A failed build leaves the serving version untouched."""
        async with self._lock(agent.id):
            number = await self.repo.next_version_number(agent.id)
            version = f"v{number}"
            vdir = self.paths.version_dir(agent.id, version)
            vdir.mkdir(parents=True, exist_ok=True)
            try:
                info = await asyncio.to_thread(
                    extract_bundle, bundle, self.paths.source(agent.id, version)
                )
            except VoicefleetError:
                shutil.rmtree(vdir, ignore_errors=True)
                raise
            shutil.move(bundle, self.paths.bundle(agent.id, version))
            row = VersionRow(
                agent_id=agent.id,
                version=version,
                number=number,
                status="building",
                source_digest=getattr(info, "digest", "") or "",
                created_at=time.time(),
            )
            await self.repo.save(row)
        await self.repo.event(agent.id, "version_uploaded", f"{version} uploaded for {deployment}")
        self._spawn(self._build_and_roll(agent, row, deployment))
        return row

    async def _build_and_roll(self, agent: AgentRow, row: VersionRow, deployment: str) -> None:
        log_path = self.paths.build_log(agent.id, row.version)
        with open(log_path, "a", buffering=1) as out:

            def write(line: str) -> None:
                out.write(line + "\n")

            try:
                artifact = await self.builder.build(self.paths.source(agent.id, row.version), write)
            except BuildFailed as e:
                out.write(f"build failed: {e}\n")
                row.status, row.error = "failed", str(e)
                await self.repo.save(row)
                await self.repo.event(agent.id, "build_failed", f"{row.version}: {e}")
                return
            except Exception as e:
                log.exception("build crashed", extra={"agent": agent.id, "version": row.version})
                out.write(f"build failed: {e}\n")
                row.status, row.error = "failed", f"build crashed: {e}"
                await self.repo.save(row)
                return
            reuse = "reused cached environment" if artifact.cached else "built environment"
            out.write(f"{reuse} {artifact.env_dir}\n")
            row.status, row.built_at = "ready", time.time()
            row.dependency_digest, row.python = artifact.dependency_digest, str(artifact.python)
            await self.repo.save(row)
            out.write(f"version {row.version} is ready\n")
        await self.repo.event(agent.id, "version_built", f"{row.version} built ({reuse})")
        await self.roll_to(agent, deployment, row.version)

    async def versions(self, agent: AgentRow) -> list[VersionRow]:
        return await self.repo.versions(agent.id)

    async def version(self, agent: AgentRow, version: str) -> VersionRow:
        row = await self.repo.version(agent.id, version)
        if row is None:
            raise NotFound(f"agent {agent.name} has no version '{version}'")
        return row

    # -- rollouts -----------------------------------------------------------------------------

    async def roll_to(
        self, agent: AgentRow, deployment: str, version: str, kind: str = "deploy"
    ) -> RolloutRow:
        row = await self.version(agent, version)
        if row.status != "ready":
            raise InvalidRequest(f"{version} is {row.status}, not ready: it cannot be rolled out")
        dep = await self.deployment(agent, deployment)
        for running in await self.repo.rollouts(agent.id, [PROGRESSING]):
            if running.deployment == deployment:
                raise InvalidRequest(
                    f"rollout {running.id} to {running.to_version} is still in progress"
                )
        now = time.time()
        rollout = RolloutRow(
            id=new_id("RO_"),
            agent_id=agent.id,
            deployment=deployment,
            from_version=dep.version,
            to_version=version,
            strategy="rolling",
            state=PROGRESSING,
            step="",
            reason=kind,
            created_at=now,
            updated_at=now,
        )
        await self.repo.save(rollout)
        await self.repo.event(
            agent.id, f"{kind}_started", f"{deployment}: {dep.version or '-'} -> {version}"
        )
        self._spawn(self._run_rollout(rollout))
        return rollout

    async def rollback(
        self, agent: AgentRow, deployment: str, to_version: str | None = None
    ) -> RolloutRow:
        """Back to `to_version`, or the version served before the current one. No rebuild."""
        dep = await self.deployment(agent, deployment)
        if to_version is None:
            done = [
                r
                for r in await self.repo.rollouts(agent.id, ["complete"], limit=200)
                if r.deployment == deployment and r.to_version == dep.version and r.from_version
            ]
            if not done:
                raise InvalidRequest(f"{deployment} has no earlier version to roll back to")
            to_version = done[0].from_version
        if to_version == dep.version:
            raise InvalidRequest(f"{deployment} already serves {to_version}")
        return await self.roll_to(agent, deployment, to_version, kind="rollback")

    async def restart(self, agent: AgentRow, deployment: str) -> RolloutRow:
        """New instances of the serving version replace the old ones, draining them."""
        dep = await self.deployment(agent, deployment)
        if not dep.version:
            raise InvalidRequest(f"{deployment} serves no version yet")
        return await self.roll_to(agent, deployment, dep.version, kind="restart")

    async def scale(self, agent: AgentRow, deployment: str, replicas: int) -> DeploymentRow:
        if not 0 <= replicas <= 100:
            raise InvalidRequest("replicas must be between 0 and 100")
        dep = await self.deployment(agent, deployment)
        dep.replicas, dep.updated_at = replicas, time.time()
        await self.repo.save(dep)
        await self.repo.event(agent.id, "scaled", f"{deployment}: {replicas} instance(s)")
        if dep.version:
            await self.ensure_instances(agent.id, deployment, dep.version, None)
            live = [
                r
                for r in await self.repo.instances(agent.id, LIVE)
                if r.deployment == deployment and r.version == dep.version
            ]
            # Scale down: idle instances first; an instance with sessions drains, never cut.
            extra = sorted(live, key=lambda r: self._sessions(r.id))[: max(0, len(live) - replicas)]
            for row in extra:
                await self._drain(row, agent.grace_period)
        return dep

    async def _run_rollout(self, rollout: RolloutRow) -> None:
        async with self._lock(rollout.agent_id):
            try:
                await run_rolling(rollout, self, self.repo)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.exception("rollout failed", extra={"rollout": rollout.id})
                rollout.state, rollout.reason = "aborted", f"internal error: {e}"
                await self.repo.save(rollout)

    # -- the Fleet a rollout drives -----------------------------------------------------------

    async def ensure_instances(
        self, agent_id: str, deployment: str, version: str, fresh_since: float | None
    ) -> list[str]:
        agent = await self.agent(agent_id)
        dep = await self.deployment(agent, deployment)
        rows = [
            r
            for r in await self.repo.instances(agent_id, [*LIVE, RETIRING])
            if r.deployment == deployment
            and r.version == version
            and (fresh_since is None or r.created_at >= fresh_since)
            and (r.status != RETIRING or self._warm(r.id))
        ][: max(dep.replicas, 1)]
        for row in rows:
            if row.status == RETIRING:  # a rollback: take the warm instance back
                await self.repo.set_instance_status(row.id, "ready")
                log.info("retired instance taken back", extra={"instance": row.id})
        while len(rows) < dep.replicas:
            rows.append(await self._start_instance(agent, deployment, version))
        return [r.id for r in rows]

    async def wait_serving(self, instance_ids: list[str]) -> None:
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
                registered = any(
                    w.identity.instance == instance_id
                    for w in self.dispatch.registry.workers.values()
                )
                if registered and state.status == InstanceStatus.READY:
                    pending.discard(instance_id)
            if time.monotonic() > deadline:
                raise RolloutFailed(
                    f"instances {sorted(pending)} not serving after {self.serving_timeout:g}s"
                )
            await asyncio.sleep(0.1)

    async def route(self, agent_id: str, deployment: str, version: str) -> None:
        agent = await self.agent(agent_id)
        dep = await self.deployment(agent, deployment)
        dep.version, dep.updated_at = version, time.time()
        await self.repo.save(dep)
        if deployment == DEFAULT_DEPLOYMENT:
            self.dispatch.routing.route(agent.name, {version})

    async def drain_others(self, agent_id: str, deployment: str, keep: list[str]) -> list[str]:
        agent = await self.agent(agent_id)
        serving = (await self.deployment(agent, deployment)).version
        drained = []
        for row in await self.repo.instances(agent_id, LIVE):
            if row.deployment != deployment or row.id in keep:
                continue
            if row.version == serving:
                # A restart: routing by version cannot tell these from their replacements.
                await self._drain(row, agent.grace_period)
            else:
                await self.repo.set_instance_status(row.id, RETIRING)
            drained.append(row.id)
        return drained

    def _warm(self, instance_id: str) -> bool:
        """Running, healthy and registered: it can take sessions again the moment it is routed."""
        state = self.runtime.get(instance_id)
        return (
            state is not None
            and state.status == InstanceStatus.READY
            and any(
                # Connected and not draining; FULL is passing and does not count against it.
                w.identity.instance == instance_id and w.connected and not w.draining
                for w in self.dispatch.registry.workers.values()
            )
        )

    async def _reap_retired(self, interval: float = 1.0) -> None:
        """Drain retired instances once idle past `keep_warm`, or at the end of the grace."""
        while True:
            await asyncio.sleep(interval)
            now = time.time()
            for row in await self.repo.instances(statuses=[RETIRING]):
                agent = await self.repo.agent(row.agent_id)
                grace = agent.grace_period if agent else 0.0
                age = now - row.updated_at
                if (self._sessions(row.id) == 0 and age >= self.keep_warm) or age >= grace:
                    await self._drain(row, max(0.0, grace - age))

    async def stop_instances(self, instance_ids: list[str]) -> None:
        for instance_id in instance_ids:
            await self.runtime.stop(instance_id)
            await self.repo.set_instance_status(instance_id, "stopped")

    # -- instances ----------------------------------------------------------------------------

    def _sessions(self, instance_id: str) -> int:
        return sum(
            len(w.jobs)
            for w in self.dispatch.registry.workers.values()
            if w.identity.instance == instance_id
        )

    async def _spec(
        self, agent: AgentRow, deployment: str, version: str, instance_id: str
    ) -> InstanceSpec:
        row = await self.version(agent, version)
        project = self.dispatch.project
        identity = WorkerIdentity(agent=agent.id, version=row.version, instance=instance_id)
        key, secret = instance_credentials(project.api_secret, identity)
        env = {s.name: self.box.open_value(s.value) for s in await self.repo.secrets(agent.id)}
        env.update(
            LIVEKIT_URL=self.worker_url(),
            LIVEKIT_API_KEY=key,
            LIVEKIT_API_SECRET=secret,
            LIVEKIT_AGENT_DEPLOYMENT=deployment,
            LIVEKIT_AGENT_NAME_OVERRIDE=agent.name,
            VOICEFLEET_AGENT_ID=agent.id,
            VOICEFLEET_VERSION=row.version,
            VOICEFLEET_INSTANCE_ID=instance_id,
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

    async def _start_instance(self, agent: AgentRow, deployment: str, version: str) -> InstanceRow:
        instance_id = new_id(f"{agent.name[:20]}-{version}-")
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
        row.pid, row.pid_started_at = state.pid or 0, state.started_at or 0.0
        await self.repo.save(row)
        log.info("instance started", extra={"instance": instance_id, "pid": row.pid})
        return row

    async def _drain(self, row: InstanceRow, grace: float) -> None:
        # The dispatcher stops offering jobs first; then the process gets SIGTERM.
        for worker in list(self.dispatch.registry.workers.values()):
            if worker.identity.instance == row.id:
                self.dispatch.registry.drain(worker)
        await self.repo.set_instance_status(row.id, "draining")
        await self.runtime.drain(row.id, grace)

    async def _adopt_or_restart(self, row: InstanceRow) -> None:
        agent = await self.repo.agent(row.agent_id)
        if agent is None:
            return
        spec = await self._spec(agent, row.deployment, row.version, row.id)
        state = await self.runtime.adopt(spec, row.pid, row.pid_started_at) if row.pid else None
        if state is not None:
            log.info("instance re-adopted", extra={"instance": row.id, "pid": row.pid})
            if row.status == "draining":
                await self.runtime.drain(row.id, agent.grace_period)
            return
        if row.status in ("draining", RETIRING):
            await self.repo.set_instance_status(row.id, "stopped")
            return
        state = await self.runtime.start(spec)
        await self.repo.set_instance_status(
            row.id, "starting", pid=state.pid or 0, pid_started_at=state.started_at or 0.0
        )
        log.info("instance restarted after server restart", extra={"instance": row.id})

    def _instance_changed(self, instance_id: str, status: InstanceStatus) -> None:
        self._spawn(self._persist_instance(instance_id, status))

    async def _persist_instance(self, instance_id: str, status: InstanceStatus) -> None:
        state = self.runtime.get(instance_id)
        fields: dict[str, Any] = {}
        if state is not None and state.pid:
            fields = {"pid": state.pid, "pid_started_at": state.started_at or 0.0}
        # A retired instance that restarts after a crash stays retired: routing excludes it.
        unless = RETIRING if status != InstanceStatus.STOPPED else None
        await self.repo.set_instance_status(instance_id, str(status.value), unless=unless, **fields)

    # -- secrets ------------------------------------------------------------------------------

    async def set_secrets(self, agent: AgentRow, values: Mapping[str, str]) -> list[str]:
        for name in values:
            if not name or not (name.replace("_", "a").isalnum()) or name[0].isdigit():
                raise InvalidRequest(f"secret name '{name}' must be a valid environment variable")
        now = time.time()
        await self.repo.save(
            *(
                SecretRow(agent_id=agent.id, name=n, value=self.box.seal(v), updated_at=now)
                for n, v in values.items()
            )
        )
        names = sorted(values)
        await self.repo.event(agent.id, "secrets_set", f"secrets set: {', '.join(names)}")
        return names

    async def secret_names(self, agent: AgentRow) -> list[dict[str, Any]]:
        return [
            {"name": s.name, "updated_at": s.updated_at} for s in await self.repo.secrets(agent.id)
        ]

    async def unset_secrets(self, agent: AgentRow, names: list[str]) -> int:
        removed = await self.repo.unset_secrets(agent.id, names)
        await self.repo.event(agent.id, "secrets_unset", f"secrets removed: {', '.join(names)}")
        return removed

    # -- status -------------------------------------------------------------------------------

    async def status(self, agent: AgentRow) -> dict[str, Any]:
        instances = []
        for row in await self.repo.instances(agent.id):
            if row.status == "stopped" and time.time() - row.updated_at > 3600:
                continue
            state = self.runtime.get(row.id)
            instances.append(
                {
                    "id": row.id,
                    "deployment": row.deployment,
                    "version": row.version,
                    "status": row.status,
                    "pid": row.pid,
                    "sessions": self._sessions(row.id),
                    "restarts": state.restarts if state else 0,
                    "registered": any(
                        w.identity.instance == row.id
                        for w in self.dispatch.registry.workers.values()
                    ),
                }
            )
        rollouts = await self.repo.rollouts(agent.id, limit=5)
        return {
            "agent": {"id": agent.id, "name": agent.name, "grace_period": agent.grace_period},
            "deployments": [
                {"name": d.name, "version": d.version, "replicas": d.replicas}
                for d in await self.repo.deployments(agent.id)
            ],
            "instances": instances,
            "rollouts": [rollout_dict(r) for r in rollouts],
        }


def rollout_dict(r: RolloutRow) -> dict[str, Any]:
    return {
        "id": r.id,
        "deployment": r.deployment,
        "from_version": r.from_version,
        "to_version": r.to_version,
        "strategy": r.strategy,
        "state": r.state,
        "step": r.step,
        "reason": r.reason,
        "created_at": r.created_at,
        "updated_at": r.updated_at,
    }
