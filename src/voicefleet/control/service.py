"""The control plane's use cases: agents, versions, deploys, rollbacks, scaling, secrets.

It owns the store's rows and turns them into action through the builder (source -> version),
the rollout runner (`voicefleet.rollout`: version -> serving, step by step), the fleet
(`voicefleet.fleet`: instances) and the dispatcher's facade (routing). It is built, with
everything it is handed, by the composition root (`voicefleet.server`). `vf agent status`'s
view is built in `status.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

from voicefleet.autoscale.policy import Policy
from voicefleet.build import node
from voicefleet.build.bundle import extract_bundle
from voicefleet.build.image import check_reference
from voicefleet.build.local import LocalBuilder
from voicefleet.control.builds import EnvironmentBuilds, VersionBuilder
from voicefleet.control.sizing import Sizing
from voicefleet.dispatch.jobs import new_id
from voicefleet.dispatch.service import DispatchService
from voicefleet.errors import BuildFailed, BundleRejected, Conflict, InvalidRequest, NotFound
from voicefleet.fleet import LIVE, Instances, Lifecycle, Paths
from voicefleet.rollout.model import RUNNING, SERVED, RolloutState
from voicefleet.rollout.plans import Plan
from voicefleet.rollout.rolling import Rolling
from voicefleet.rollout.runner import Rollouts
from voicefleet.store.models import (
    SYSTEM,
    Actor,
    AgentRow,
    DeploymentRow,
    EventRow,
    RolloutRow,
    SecretRow,
    VersionRow,
    VersionStatus,
)
from voicefleet.store.repo import Repo
from voicefleet.store.secrets import SecretBox

# A secret given as an environment variable: a name a shell would take.
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A secret given as a file (`--secret-mount`): the file's own name, nothing that leaves the
# instance's secrets directory.
FILE_NAME = re.compile(r"[A-Za-z0-9._-]{1,200}")
MAX_SECRET_FILE = 1024 * 1024  # bytes; as LiveKit Cloud's

log = logging.getLogger("voicefleet.control")

DEFAULT_DEPLOYMENT = "production"
AGENT_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_")


class BuildLog:
    """A version's build log. A line that cannot be written (a full disk) ends the log, never
    the build: the version still ends built or failed, never left "building"; `error` says why
    the log stopped."""

    def __init__(self, path: Path) -> None:
        self.error = ""
        self._out: TextIO | None = None
        try:
            self._out = open(path, "a", buffering=1)  # closed by close()
        except OSError as e:
            self.error = str(e)

    def write(self, line: str) -> None:
        if self._out is None:
            return
        try:
            self._out.write(line + "\n")
        except OSError as e:
            self.error = str(e)
            self.close()

    def close(self) -> None:
        out, self._out = self._out, None
        if out is not None:
            with contextlib.suppress(OSError):
                out.close()

    def __enter__(self) -> BuildLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ControlPlane:
    def __init__(
        self,
        repo: Repo,
        dispatch: DispatchService,
        fleet: Instances,
        rollouts: Rollouts,
        sizing: Sizing,
        builds: VersionBuilder | None,
        box: SecretBox,
        paths: Paths,
        *,
        runs_images: bool = False,
    ) -> None:
        """`builds`: how an upload becomes a version (None: this server cannot build one, only
        take a prebuilt image). `runs_images`: the runtime runs container images (Kubernetes),
        so a version may be a prebuilt image (`deploy_image`)."""
        self.repo = repo
        self.dispatch = dispatch
        self.fleet = fleet
        self.runner = rollouts
        self.sizing = sizing
        self.builds = builds
        self.runs_images = runs_images
        self.box = box
        self.paths = paths
        self._builds: set[asyncio.Task[None]] = set()
        # Told of each build's end: (agent id, result: built, cached or failed, seconds).
        self.on_build: Callable[[str, str, float], None] = lambda agent_id, result, seconds: None
        # Brief: numbering a version, or checking then recording a rollout, one at a time.
        self._recording: dict[str, asyncio.Lock] = {}

    # -- lifecycle ----------------------------------------------------------------------------

    async def restore(self) -> None:
        """Take back what the last run left: routes as recorded; builds it was running failed;
        ready versions whose environment is not here (a restored backup, an emptied env cache)
        built again from their sources, before any instance of them starts."""
        for dep in await self.repo.deployments():
            agent = await self.repo.agent(dep.agent_id)
            if agent is not None and dep.version:
                self.dispatch.set_weights(agent.name, {dep.version: 100}, dep.name)
        # Environments are this machine's (the local runtime); images live in a registry.
        builder = self.builds.builder if isinstance(self.builds, EnvironmentBuilds) else None
        for agent in await self.repo.agents():
            for v in await self.repo.versions(agent.id):
                if v.status == VersionStatus.BUILDING:
                    v.status = VersionStatus.FAILED
                    v.error = "the server restarted during the build"
                    await self.repo.save(v)
                elif (
                    builder is not None
                    and v.status == VersionStatus.READY
                    and self._environment_missing(builder, agent, v)
                ):
                    await self._rebuild(builder, agent, v)

    def _environment_missing(self, builder: LocalBuilder, agent: AgentRow, row: VersionRow) -> bool:
        source = self.paths.source(agent.id, row.version)
        if not source.is_dir():
            return True  # a data dir put back by hand: bundles copied, sources not unpacked
        if node.is_node_agent(source):
            return not (source / "node_modules").exists()  # a link into the cache
        python = Path(row.python)
        # In this server's cache: one of another data dir (a backup's origin) is not ours.
        return not (python.exists() and python.is_relative_to(builder.cache_dir))

    async def _rebuild(self, builder: LocalBuilder, agent: AgentRow, row: VersionRow) -> None:
        """The environment of a version that was built once, from its sources and lockfile: the
        same dependencies (the digest says so), no new version. Sources missing (a data dir
        put back by hand, bundles only) are unpacked from the bundle; with no bundle either,
        or one that is refused, the version fails: it cannot run."""
        source = self.paths.source(agent.id, row.version)
        bundle = self.paths.bundle(agent.id, row.version)
        where = {"agent": agent.id, "version": row.version}
        if not source.is_dir() and bundle.is_file():
            with contextlib.suppress(BundleRejected):  # then it has no sources: failed below
                await asyncio.to_thread(extract_bundle, bundle, source)
        if not source.is_dir():
            row.status = VersionStatus.FAILED
            row.error = "its sources are not in the data dir (restored without its bundle?)"
            await self.repo.save(row)
            log.error("version without sources or bundle: failed", extra=where)
            return
        log.info("environment missing: building it again", extra=where)
        with BuildLog(self.paths.build_log(agent.id, row.version)) as out:
            out.write("--- environment missing at start (a restored data dir?): built again")
            try:
                artifact = await builder.build(source, out.write)
            except Exception as e:  # the version stays ready: the next start tries again
                out.write(f"build failed: {e}")
                log.error("environment not rebuilt: %s", e, extra=where)
                row.error = f"its environment could not be built again: {e}"
                await self.repo.save(row)
                return
        if artifact.dependency_digest != row.dependency_digest:
            log.warning("rebuilt with another digest (another Python?)", extra=where)
        row.python, row.dependency_digest, row.error = (
            str(artifact.python),
            artifact.dependency_digest,
            "",
        )
        await self.repo.save(row)
        await self.repo.event(
            agent.id, "environment_rebuilt", f"{row.version}: environment built again at start"
        )

    async def close(self) -> None:
        """Stop the builds under way (their versions are failed at the next start)."""
        for task in list(self._builds):
            task.cancel()
        await asyncio.gather(*self._builds, return_exceptions=True)

    # -- agents -------------------------------------------------------------------------------

    async def create_agent(
        self, name: str, grace_period: float = 3600.0, actor: Actor = SYSTEM
    ) -> AgentRow:
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
        await self.repo.event(agent.id, "agent_created", f"agent {name} created", actor)
        return agent

    async def agent(self, key: str) -> AgentRow:
        agent = await self.repo.agent(key)
        if agent is None:
            raise NotFound(f"no agent '{key}'")
        return agent

    async def find_agent(self, key: str) -> AgentRow | None:
        """The agent of that id or name, if there is one."""
        return await self.repo.agent(key)

    async def agents_serving(self) -> list[tuple[AgentRow, dict[str, str]]]:
        """Every agent, with the version each of its deployments serves."""
        return [
            (agent, {d.name: d.version for d in await self.repo.deployments(agent.id)})
            for agent in await self.repo.agents()
        ]

    async def deployments(self, agent: AgentRow) -> list[DeploymentRow]:
        return await self.repo.deployments(agent.id)

    async def events(self, agent: AgentRow, limit: int = 100) -> list[EventRow]:
        return await self.repo.events(agent.id, limit)

    async def event_log(self, agent_id: str | None, limit: int, **filters: Any) -> list[EventRow]:
        """Events of one agent (by id: a deleted agent's too) or all, newest first; the
        filters are `Repo.events`'."""
        return await self.repo.events(agent_id, limit, **filters)

    async def agent_names(self) -> dict[str, str]:
        return {a.id: a.name for a in await self.repo.agents()}

    async def ensure_deployment(self, agent: AgentRow, name: str) -> DeploymentRow:
        """The agent's deployment of that name, created (serving nothing) if there is none."""
        dep = await self.repo.deployment(agent.id, name)
        if dep is None:
            dep = DeploymentRow(
                agent_id=agent.id, name=name, version="", replicas=1, updated_at=time.time()
            )
            await self.repo.save(dep)
        return dep

    async def configure(
        self, agent: AgentRow, *, grace_period: float | None = None, actor: Actor = SYSTEM
    ) -> AgentRow:
        if grace_period is not None:
            if grace_period < 0:
                raise InvalidRequest("grace period must be >= 0 seconds")
            agent.grace_period = grace_period
            await self.repo.save(agent)
            await self.repo.event(
                agent.id, "agent_configured", f"grace period {grace_period:g}s", actor
            )
        return agent

    async def set_routing(
        self,
        agent_name: str,
        weights: dict[str, float] | None,
        deployment: str = "",
        actor: Actor = SYSTEM,
    ) -> dict[str, float] | None:
        """Route the sessions of an agent name voicefleet does not deploy (workers that sign
        with version keys of their own) by version; None removes the entry."""
        if await self.repo.agent(agent_name) is not None:
            raise Conflict(f"{agent_name} is a deployed agent: its rollouts route it")
        try:
            self.dispatch.set_weights(agent_name, weights, deployment)
        except ValueError as e:
            raise InvalidRequest(str(e)) from None
        where = f"{agent_name}/{deployment}" if deployment else agent_name
        await self.repo.event("", "routing_set", f"{where}: {weights or 'any version'}", actor)
        return self.dispatch.weights(agent_name, deployment)

    async def delete_agent(self, agent: AgentRow, actor: Actor = SYSTEM) -> None:
        """Stop routing to the agent and drain its instances; sessions in flight finish."""
        for dep in await self.repo.deployments(agent.id):
            self.dispatch.set_weights(agent.name, {}, dep.name)
        for row in await self.repo.instances(agent.id, [*LIVE, Lifecycle.RETIRING]):
            await self.fleet.drain_row(row, agent.grace_period)
        await self.repo.delete_agent(agent.id)
        await self.repo.event(agent.id, "agent_deleted", f"agent {agent.name} deleted", actor)

    # -- versions -----------------------------------------------------------------------------

    async def upload(
        self,
        agent: AgentRow,
        bundle: Path,
        deployment: str,
        plan: Plan | None = None,
        actor: Actor = SYSTEM,
    ) -> tuple[VersionRow, str]:
        """Take a source bundle: a new immutable version, built in the background, then
        rolled out to `deployment`. Returns the version and the id its rollout will have once
        it is built. A failed build leaves the serving version untouched."""
        plan = plan or Rolling()
        if self.builds is None:
            raise InvalidRequest(
                "this server runs images and has no registry to push builds to: start it with "
                "--registry HOST[:PORT][/PREFIX], or deploy a prebuilt image with --image REF"
            )
        await self._refuse_if_rolling(agent, deployment)  # ...and so does a rollout under way
        async with self._recording.setdefault(agent.id, asyncio.Lock()):
            number = await self.repo.next_version_number(agent.id)
            version = f"v{number}"
            vdir = self.paths.version_dir(agent.id, version)
            # No row has this number, so a folder of that name is what a server that stopped
            # mid-upload left: every later upload would trip over it.
            shutil.rmtree(vdir, ignore_errors=True)
            vdir.mkdir(parents=True)
            try:
                info = await asyncio.to_thread(
                    extract_bundle, bundle, self.paths.source(agent.id, version)
                )
            except BaseException:  # refused, disk full, cancelled: nothing half-unpacked stays
                shutil.rmtree(vdir, ignore_errors=True)
                raise
            shutil.move(bundle, self.paths.bundle(agent.id, version))
            row = VersionRow(
                agent_id=agent.id,
                version=version,
                number=number,
                status=VersionStatus.BUILDING,
                source_digest=getattr(info, "digest", "") or "",
                created_at=time.time(),
            )
            await self.repo.save(row)
        await self.repo.event(
            agent.id, "version_uploaded", f"{version} uploaded for {deployment}", actor
        )
        rollout_id = new_id("RO_")
        task = asyncio.create_task(
            self._build_and_roll(agent, row, deployment, plan, rollout_id, actor)
        )
        self._builds.add(task)
        task.add_done_callback(self._builds.discard)
        return row, rollout_id

    async def deploy_image(
        self,
        agent: AgentRow,
        image: str,
        deployment: str,
        plan: Plan | None = None,
        actor: Actor = SYSTEM,
    ) -> tuple[VersionRow, str]:
        """A prebuilt image as a new version: nothing to build, so it is ready at once and
        rolled out to `deployment`. Returns the version and its rollout's id. The version's
        source digest is the digest of the reference (there is no source)."""
        if not self.runs_images:
            raise InvalidRequest(
                "--image needs the Kubernetes runtime: this server runs versions as local "
                "processes built from their source (vf server --runtime kubernetes)"
            )
        try:
            check_reference(image)
        except ValueError as e:
            raise InvalidRequest(str(e)) from None
        plan = plan or Rolling()
        await self._refuse_if_rolling(agent, deployment)
        async with self._recording.setdefault(agent.id, asyncio.Lock()):
            number = await self.repo.next_version_number(agent.id)
            version = f"v{number}"
            vdir = self.paths.version_dir(agent.id, version)
            shutil.rmtree(vdir, ignore_errors=True)  # as upload(): a leftover of a stopped server
            vdir.mkdir(parents=True)
            now = time.time()
            _, _, pinned = image.partition("@")
            row = VersionRow(
                agent_id=agent.id,
                version=version,
                number=number,
                status=VersionStatus.READY,
                source_digest=hashlib.sha256(image.encode()).hexdigest(),
                image=image,
                image_digest=pinned,
                created_at=now,
                built_at=now,
            )
            await self.repo.save(row)
        with BuildLog(self.paths.build_log(agent.id, version)) as out:
            out.write(f"prebuilt image {image}: nothing to build")
            out.write(f"version {version} is ready")
        await self.repo.event(
            agent.id, "version_uploaded", f"{version} (image {image}) for {deployment}", actor
        )
        rollout_id = new_id("RO_")
        try:
            await self.roll_to(
                agent, deployment, version, plan=plan, rollout_id=rollout_id, actor=actor
            )
        except InvalidRequest as e:
            row.error = f"not rolled out: {e}"
            await self.repo.save(row)
            await self.repo.event(agent.id, "rollout_refused", f"{version}: {e}")
            raise
        return row, rollout_id

    async def _build_and_roll(
        self,
        agent: AgentRow,
        row: VersionRow,
        deployment: str,
        plan: Plan,
        rollout_id: str,
        actor: Actor = SYSTEM,
    ) -> None:
        assert self.builds is not None  # upload() refuses otherwise
        began = time.monotonic()
        with BuildLog(self.paths.build_log(agent.id, row.version)) as out:
            try:
                built = await self.builds.build(
                    agent, row, self.paths.source(agent.id, row.version), out.write
                )
            except BuildFailed as e:
                self.on_build(agent.id, "failed", time.monotonic() - began)
                out.write(f"build failed: {e}")
                row.status, row.error = VersionStatus.FAILED, str(e)
                await self.repo.save(row)
                await self.repo.event(agent.id, "build_failed", f"{row.version}: {e}")
                return
            except Exception as e:
                self.on_build(agent.id, "failed", time.monotonic() - began)
                log.exception("build crashed", extra={"agent": agent.id, "version": row.version})
                out.write(f"build failed: {e}")
                row.status, row.error = VersionStatus.FAILED, f"build crashed: {e}"
                await self.repo.save(row)
                return
            self.on_build(agent.id, "cached" if built.cached else "built", time.monotonic() - began)
            row.status, row.built_at = VersionStatus.READY, time.time()
            await self.repo.save(row)
            out.write(f"version {row.version} is ready")
        if out.error:
            log.warning(
                "the build log could not be written: %s",
                out.error,
                extra={"agent": agent.id, "version": row.version},
            )
        await self.repo.event(agent.id, "version_built", f"{row.version} built ({built.summary})")
        try:
            # The deploy's rollout is the uploader's doing, though it starts after the build.
            await self.roll_to(
                agent, deployment, row.version, plan=plan, rollout_id=rollout_id, actor=actor
            )
        except InvalidRequest as e:  # e.g. another deploy's rollout began during the build
            row.error = f"built, not rolled out: {e}"
            await self.repo.save(row)
            await self.repo.event(agent.id, "rollout_refused", f"{row.version}: {e}")

    async def versions(self, agent: AgentRow) -> list[VersionRow]:
        return await self.repo.versions(agent.id)

    async def version(self, agent: AgentRow, version: str) -> VersionRow:
        row = await self.repo.version(agent.id, version)
        if row is None:
            raise NotFound(f"agent {agent.name} has no version '{version}'")
        return row

    # -- rollouts -----------------------------------------------------------------------------

    async def roll_to(
        self,
        agent: AgentRow,
        deployment: str,
        version: str,
        kind: str = "deploy",
        plan: Plan | None = None,
        rollout_id: str | None = None,
        actor: Actor = SYSTEM,
    ) -> RolloutRow:
        """Start a rollout of `version` to `deployment`; `plan` picks the strategy (rolling by
        default)."""
        plan = plan or Rolling()
        row = await self.version(agent, version)
        if row.status != VersionStatus.READY:
            raise InvalidRequest(f"{version} is {row.status}, not ready: it cannot be rolled out")
        # Checked and recorded as one step: two deploys at once cannot both pass the check.
        async with self._recording.setdefault(agent.id, asyncio.Lock()):
            dep = await self.ensure_deployment(agent, deployment)
            strategy = plan.strategy
            if strategy != "rolling" and (not dep.version or dep.version == version):
                raise InvalidRequest(
                    f"a {strategy} deploy needs another version serving {deployment} "
                    f"(it serves {dep.version or 'nothing'}); deploy without --{strategy} first"
                )
            await self._refuse_if_rolling(agent, deployment)
            now = time.time()
            rollout = RolloutRow(
                id=rollout_id or new_id("RO_"),
                agent_id=agent.id,
                deployment=deployment,
                from_version=dep.version,
                to_version=version,
                strategy=strategy,
                state=RolloutState.PROGRESSING,
                step="",
                reason=kind,
                plan={**plan.to_dict(), "replicas": max(dep.replicas, 1)},
                created_at=now,
                updated_at=now,
            )
            await self.repo.save(rollout)
        await self.repo.event(
            agent.id,
            f"{kind}_started",
            f"{deployment}: {dep.version or '-'} -> {version} ({strategy})",
            actor,
        )
        self.runner.start(rollout)
        return rollout

    async def rollout(self, agent: AgentRow, rollout_id: str) -> RolloutRow | None:
        """The agent's rollout of that id (None if it has none)."""
        rollout = await self.repo.rollout(rollout_id)
        return rollout if rollout is not None and rollout.agent_id == agent.id else None

    async def rollouts(self, agent: AgentRow) -> list[RolloutRow]:
        """The agent's rollouts, newest first."""
        return await self.repo.rollouts(agent.id)

    async def _refuse_if_rolling(self, agent: AgentRow, deployment: str) -> None:
        """One rollout per deployment at a time: say which one is in the way and how to end it."""
        for running in await self.repo.rollouts(agent.id, list(RUNNING)):
            if running.deployment == deployment:
                how = (
                    "promote or abort it first (vf agent canary promote|abort)"
                    if running.strategy == "canary"
                    else "wait for it to end"
                )
                raise InvalidRequest(
                    f"{running.strategy} rollout {running.id} to {running.to_version} is in "
                    f"progress on {deployment}: {how}"
                )

    async def rollback(
        self,
        agent: AgentRow,
        deployment: str,
        to_version: str | None = None,
        actor: Actor = SYSTEM,
    ) -> RolloutRow:
        """Back to `to_version`, or the version served before the current one. No rebuild."""
        dep = await self.ensure_deployment(agent, deployment)
        if to_version is None:
            done = [
                r
                for r in await self.repo.rollouts(agent.id, list(SERVED), limit=200)
                if r.deployment == deployment and r.to_version == dep.version and r.from_version
            ]
            if not done:
                raise InvalidRequest(f"{deployment} has no earlier version to roll back to")
            to_version = done[0].from_version
        if to_version == dep.version:
            raise InvalidRequest(f"{deployment} already serves {to_version}")
        return await self.roll_to(agent, deployment, to_version, kind="rollback", actor=actor)

    async def restart(self, agent: AgentRow, deployment: str, actor: Actor = SYSTEM) -> RolloutRow:
        """New instances of the serving version replace the old ones, draining them."""
        dep = await self.ensure_deployment(agent, deployment)
        if not dep.version:
            raise InvalidRequest(f"{deployment} serves no version yet")
        return await self.roll_to(agent, deployment, dep.version, kind="restart", actor=actor)

    async def promote(
        self, agent: AgentRow, source: str, target: str, actor: Actor = SYSTEM
    ) -> RolloutRow:
        """Roll the version `source` serves out to `target`. No rebuild."""
        dep = await self.ensure_deployment(agent, source)
        if not dep.version:
            raise InvalidRequest(f"deployment {source} serves no version to promote")
        return await self.roll_to(agent, target, dep.version, kind="promote", actor=actor)

    async def scale(
        self,
        agent: AgentRow,
        deployment: str,
        replicas: int | None = None,
        autoscale: dict[str, Any] | None = None,
        actor: Actor = SYSTEM,
    ) -> DeploymentRow:
        """Set a fixed size (`replicas`, turning autoscaling off) or an autoscaling policy."""
        dep = await self.ensure_deployment(agent, deployment)
        if autoscale is not None:
            try:
                policy = Policy.from_dict({**(dep.autoscale or {}), **autoscale})
            except (TypeError, ValueError) as e:
                raise InvalidRequest(f"bad autoscaling policy: {e}") from None
            dep.autoscale = policy.to_dict()
            await self.repo.save(dep)
            await self.repo.event(
                agent.id, "autoscale_set", f"{deployment}: {dep.autoscale}", actor
            )
            return dep
        if replicas is None:
            raise InvalidRequest("give a number of instances or an autoscaling policy")
        if not 0 <= replicas <= 100:
            raise InvalidRequest("replicas must be between 0 and 100")
        await self._refuse_if_rolling(agent, deployment)  # its sizes are its own
        async with self.sizing.lock(agent.id, deployment):
            dep = await self.ensure_deployment(agent, deployment)  # as it is now, under the lock
            if dep.autoscale is not None:
                dep.autoscale = None
                await self.repo.event(agent.id, "autoscale_off", f"{deployment}: fixed size", actor)
            await self.repo.event(
                agent.id, "scaled", f"{deployment}: {replicas} instance(s)", actor
            )
            await self.sizing.resize(agent, dep, replicas)
        return dep

    async def rollout_command(
        self, agent: AgentRow, deployment: str, command: str, actor: Actor = SYSTEM
    ) -> RolloutRow:
        """pause, resume, promote or abort the canary running on `deployment`."""
        return await self.runner.command(agent, deployment, command, actor)

    # -- secrets ------------------------------------------------------------------------------

    async def set_secrets(
        self,
        agent: AgentRow,
        values: Mapping[str, str],
        actor: Actor = SYSTEM,
        files: Mapping[str, bytes] | None = None,
        overwrite: bool = False,
    ) -> list[str]:
        """Store secrets: `values` as environment variables, `files` as files of that name in
        each instance's secrets directory. Merged into the agent's set, or with `overwrite`
        the whole set becomes these. Everything is checked first: one bad name stores nothing.
        Instances started from now on see them."""
        files = files or {}
        for name in values:
            if not ENV_NAME.fullmatch(name):
                raise InvalidRequest(f"secret name '{name}' must be a valid environment variable")
            if "\x00" in values[name]:
                raise InvalidRequest(f"secret {name}: an environment variable cannot hold a NUL")
        for name, content in files.items():
            if not FILE_NAME.fullmatch(name) or name in (".", ".."):
                raise InvalidRequest(
                    f"secret file name '{name}' must be 1-200 letters, digits, '.', '-' or '_'"
                )
            if len(content) > MAX_SECRET_FILE:
                raise InvalidRequest(
                    f"secret file {name} is {len(content)} bytes: the limit is {MAX_SECRET_FILE}"
                )
            if name in values:
                raise InvalidRequest(f"secret {name} given both as a value and as a file")
        if not values and not files and not overwrite:
            raise InvalidRequest("no secrets given")
        now = time.time()
        rows = [
            SecretRow(agent_id=agent.id, name=n, value=self.box.seal(v), updated_at=now, kind="env")
            for n, v in values.items()
        ] + [
            SecretRow(
                agent_id=agent.id, name=n, value=self.box.seal(c), updated_at=now, kind="file"
            )
            for n, c in files.items()
        ]
        if overwrite:
            await self.repo.replace_secrets(agent.id, rows)
        else:
            await self.repo.save(*rows)
        names = sorted([*values, *files])
        what = "secrets replaced by" if overwrite else "secrets set:"
        await self.repo.event(
            agent.id, "secrets_set", f"{what} {', '.join(names) or '(none)'}", actor
        )
        return names

    async def secret_names(self, agent: AgentRow) -> list[dict[str, Any]]:
        return [
            {"name": s.name, "kind": s.kind, "updated_at": s.updated_at}
            for s in await self.repo.secrets(agent.id)
        ]

    async def unset_secrets(self, agent: AgentRow, names: list[str], actor: Actor = SYSTEM) -> int:
        removed = await self.repo.unset_secrets(agent.id, names)
        await self.repo.event(
            agent.id, "secrets_unset", f"secrets removed: {', '.join(names)}", actor
        )
        return removed


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
        "plan": r.plan,
        "weight": r.weight,
        "step_started_at": r.step_started_at,
        "created_at": r.created_at,
        "updated_at": r.updated_at,
    }
