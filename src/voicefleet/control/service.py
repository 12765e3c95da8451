"""The control plane: agents, versions, deploys, rollbacks, scaling, secrets.

It owns the store's rows and turns them into action through the builder (source -> version),
its instances (`instances.py`: version -> running processes) and the dispatcher's routing table
(which version takes new sessions). Rollout steps live in `voicefleet.rollout`; `vf agent
status`'s view is built in `status.py`, blue-green's smoke test runs in `smoke.py`.
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

from voicefleet.autoscale.loop import Autoscaler
from voicefleet.autoscale.policy import Policy, pick_victims
from voicefleet.build.bundle import extract_bundle
from voicefleet.build.local import LocalBuilder
from voicefleet.control.instances import LIVE, RETIRING, Instances
from voicefleet.control.secrets import SecretBox
from voicefleet.control.smoke import smoke_test
from voicefleet.dispatch.service import DispatchService
from voicefleet.dispatch.stats import Window
from voicefleet.errors import BuildFailed, InvalidRequest, NotFound
from voicefleet.rollout.analysis import Context
from voicefleet.rollout.bluegreen import SmokeTest, run_bluegreen
from voicefleet.rollout.canary import COMMANDS, PAUSED, PROMOTED, CanaryPlan, run_canary
from voicefleet.rollout.rolling import COMPLETE, PROGRESSING, run_rolling
from voicefleet.runtime import Runtime
from voicefleet.store.models import (
    AgentRow,
    DeploymentRow,
    RolloutRow,
    SecretRow,
    VersionRow,
)
from voicefleet.store.repo import Repo

log = logging.getLogger("voicefleet.control")

DEFAULT_DEPLOYMENT = "production"
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

    @property
    def sdk(self) -> Path:
        """voicefleet.sdk for the agents' own Python (voicefleet.flags.install)."""
        return self.data_dir / "sdk"

    def flags_cache(self, agent_id: str) -> Path:
        """The agent's instances' copy of its flags, for when the server is unreachable."""
        return self.data_dir / "agents" / agent_id / "flags-cache.json"

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
        self.builder = builder
        self.box = box
        self.paths = paths
        self._tasks: set[asyncio.Task[Any]] = set()
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        # Brief: numbering a version, or checking then recording a rollout, one at a time.
        self._recording: dict[str, asyncio.Lock] = {}
        # The latest operator command for a running canary (pause, resume, promote, abort).
        self._commands: dict[str, str] = {}
        self.instances = Instances(
            repo, dispatch, runtime, box, paths, worker_url, self._spawn, serving_timeout, keep_warm
        )
        self.autoscaler = Autoscaler(self)

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Take back what the last run left: instances, routes, unfinished rollouts and builds."""
        for dep in await self.repo.deployments():
            agent = await self.repo.agent(dep.agent_id)
            if agent is not None and dep.version:
                self.dispatch.routing.set_weights(agent.name, {dep.version: 100}, dep.name)
        await self.instances.adopt_all()
        self._spawn(self.instances.reap_retired())
        self._spawn(self.instances.joblogs.run())
        self._spawn(self.autoscaler.run())
        for rollout in await self.repo.rollouts(states=[PROGRESSING, PAUSED], limit=1000):
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
        await self.instances.runtime.close(leave_running=leave_running)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def lock(self, agent_id: str, deployment: str) -> asyncio.Lock:
        """Held by a rollout of the deployment (for as long as it runs) and while it is resized
        (autoscaler, `vf agent scale`): one change to a deployment's instances at a time."""
        return self._locks.setdefault((agent_id, deployment), asyncio.Lock())

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
        for dep in await self.repo.deployments(agent.id):
            self.dispatch.routing.set_weights(agent.name, {}, dep.name)
        for row in await self.repo.instances(agent.id, [*LIVE, RETIRING]):
            await self.instances.drain(row, agent.grace_period)
        await self.repo.delete_agent(agent.id)
        await self.repo.event(agent.id, "agent_deleted", f"agent {agent.name} deleted")

    # -- versions -----------------------------------------------------------------------------

    async def upload(
        self,
        agent: AgentRow,
        bundle: Path,
        deployment: str,
        plan: dict[str, Any] | None = None,
    ) -> VersionRow:
        """Take a source bundle: a new immutable version, built in the background, then
        rolled out to `deployment`. A failed build leaves the serving version untouched."""
        plan = strategy_plan(plan)  # a bad plan fails the upload, before anything is built
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
                status="building",
                source_digest=getattr(info, "digest", "") or "",
                created_at=time.time(),
            )
            await self.repo.save(row)
        await self.repo.event(agent.id, "version_uploaded", f"{version} uploaded for {deployment}")
        self._spawn(self._build_and_roll(agent, row, deployment, plan))
        return row

    async def _build_and_roll(
        self, agent: AgentRow, row: VersionRow, deployment: str, plan: dict[str, Any]
    ) -> None:
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
        try:
            await self.roll_to(agent, deployment, row.version, plan=plan)
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
        plan: dict[str, Any] | None = None,
    ) -> RolloutRow:
        """Start a rollout of `version` to `deployment`; `plan` picks the strategy (rolling by
        default; see `strategy_plan`)."""
        plan = strategy_plan(plan)
        row = await self.version(agent, version)
        if row.status != "ready":
            raise InvalidRequest(f"{version} is {row.status}, not ready: it cannot be rolled out")
        # Checked and recorded as one step: two deploys at once cannot both pass the check.
        async with self._recording.setdefault(agent.id, asyncio.Lock()):
            dep = await self.deployment(agent, deployment)
            strategy = plan["strategy"]
            if strategy != "rolling" and (not dep.version or dep.version == version):
                raise InvalidRequest(
                    f"a {strategy} deploy needs another version serving {deployment} "
                    f"(it serves {dep.version or 'nothing'}); deploy without --{strategy} first"
                )
            await self._refuse_if_rolling(agent, deployment)
            now = time.time()
            rollout = RolloutRow(
                id=new_id("RO_"),
                agent_id=agent.id,
                deployment=deployment,
                from_version=dep.version,
                to_version=version,
                strategy=strategy,
                state=PROGRESSING,
                step="",
                reason=kind,
                plan={**plan, "replicas": max(dep.replicas, 1)},
                created_at=now,
                updated_at=now,
            )
            await self.repo.save(rollout)
        await self.repo.event(
            agent.id,
            f"{kind}_started",
            f"{deployment}: {dep.version or '-'} -> {version} ({strategy})",
        )
        self._spawn(self._run_rollout(rollout))
        return rollout

    async def _refuse_if_rolling(self, agent: AgentRow, deployment: str) -> None:
        """One rollout per deployment at a time: say which one is in the way and how to end it."""
        for running in await self.repo.rollouts(agent.id, [PROGRESSING, PAUSED]):
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
        self, agent: AgentRow, deployment: str, to_version: str | None = None
    ) -> RolloutRow:
        """Back to `to_version`, or the version served before the current one. No rebuild."""
        dep = await self.deployment(agent, deployment)
        if to_version is None:
            done = [
                r
                for r in await self.repo.rollouts(agent.id, [COMPLETE, PROMOTED], limit=200)
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

    async def scale(
        self,
        agent: AgentRow,
        deployment: str,
        replicas: int | None = None,
        autoscale: dict[str, Any] | None = None,
    ) -> DeploymentRow:
        """Set a fixed size (`replicas`, turning autoscaling off) or an autoscaling policy."""
        dep = await self.deployment(agent, deployment)
        if autoscale is not None:
            try:
                policy = Policy.from_dict({**(dep.autoscale or {}), **autoscale})
            except (TypeError, ValueError) as e:
                raise InvalidRequest(f"bad autoscaling policy: {e}") from None
            dep.autoscale = policy.to_dict()
            await self.repo.save(dep)
            await self.repo.event(agent.id, "autoscale_set", f"{deployment}: {dep.autoscale}")
            return dep
        if replicas is None:
            raise InvalidRequest("give a number of instances or an autoscaling policy")
        if not 0 <= replicas <= 100:
            raise InvalidRequest("replicas must be between 0 and 100")
        await self._refuse_if_rolling(agent, deployment)  # its sizes are its own
        async with self.lock(agent.id, deployment):
            dep = await self.deployment(agent, deployment)  # as it is now, under the lock
            if dep.autoscale is not None:
                dep.autoscale = None
                await self.repo.event(agent.id, "autoscale_off", f"{deployment}: fixed size")
            await self.repo.event(agent.id, "scaled", f"{deployment}: {replicas} instance(s)")
            await self.resize(agent, dep, replicas)
        return dep

    async def resize(self, agent: AgentRow, dep: DeploymentRow, n: int) -> list[str]:
        """Run `n` instances of the deployment's version (under `lock(agent, deployment)`).
        Going down drains idle instances first; an instance with sessions drains (they finish),
        it is never cut. Returns the instances started or drained."""
        dep.replicas, dep.updated_at = n, time.time()
        await self.repo.save(dep)
        if not dep.version:
            return []
        live = [
            r
            for r in await self.repo.instances(agent.id, LIVE)
            if r.deployment == dep.name and r.version == dep.version
        ]
        if n > len(live):
            kept = await self.ensure_instances(agent.id, dep.name, dep.version, None, n)
            return [i for i in kept if i not in {r.id for r in live}]
        victims = pick_victims(self.instances.signals(live), len(live) - n)
        for victim in victims:
            row = next(r for r in live if r.id == victim.id)
            await self.instances.drain(row, agent.grace_period)
        return [v.id for v in victims]

    async def _run_rollout(self, rollout: RolloutRow) -> None:
        async with self.lock(rollout.agent_id, rollout.deployment):
            try:
                if rollout.strategy == "canary":
                    await run_canary(rollout, self, self.repo)
                elif rollout.strategy == "bluegreen":
                    await run_bluegreen(rollout, self, self.repo)
                else:
                    await run_rolling(rollout, self, self.repo)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.exception("rollout failed", extra={"rollout": rollout.id})
                rollout.state, rollout.reason = "aborted", f"internal error: {e}"
                await self.repo.save(rollout)
                await self._settle(rollout)
            finally:
                self._commands.pop(rollout.id, None)

    async def _settle(self, rollout: RolloutRow) -> None:
        """After a rollout broke off: new sessions go to the version the deployment records as
        serving, and instances of other versions retire (their sessions finish)."""
        agent = await self.repo.agent(rollout.agent_id)
        dep = await self.repo.deployment(rollout.agent_id, rollout.deployment)
        if agent is None or dep is None or not dep.version:
            return
        self.dispatch.routing.set_weights(agent.name, {dep.version: 100}, dep.name)
        serving = [
            r.id
            for r in await self.instances.live(agent.id)
            if r.deployment == dep.name and r.version == dep.version
        ]
        await self.instances.retire_others(agent, dep.name, dep.version, serving, warm=True)

    async def rollout_command(self, agent: AgentRow, deployment: str, command: str) -> RolloutRow:
        """pause, resume, promote or abort the canary running on `deployment`."""
        if command not in COMMANDS:
            raise InvalidRequest(f"unknown command '{command}' (one of {', '.join(COMMANDS)})")
        for rollout in await self.repo.rollouts(agent.id, [PROGRESSING, PAUSED]):
            if rollout.deployment == deployment and rollout.strategy == "canary":
                if rollout.step == "promote":  # past the point a command is read
                    raise InvalidRequest(f"canary {rollout.to_version} is already being promoted")
                self._commands[rollout.id] = command
                await self.repo.event(agent.id, f"canary_{command}", f"{command} requested")
                return rollout
        raise InvalidRequest(f"no canary is running on {deployment}")

    def command(self, rollout_id: str) -> str | None:
        return self._commands.get(rollout_id)

    # -- the Fleet a rollout drives -----------------------------------------------------------

    async def ensure_instances(
        self,
        agent_id: str,
        deployment: str,
        version: str,
        fresh_since: float | None,
        count: int | None = None,
    ) -> list[str]:
        """`count` (default: the deployment's replicas) live instances of `version`."""
        agent = await self.agent(agent_id)
        dep = await self.deployment(agent, deployment)
        want = dep.replicas if count is None else count
        return await self.instances.ensure(agent, deployment, version, fresh_since, want)

    async def wait_serving(self, instance_ids: list[str]) -> None:
        await self.instances.wait_serving(instance_ids)

    async def route(self, agent_id: str, deployment: str, version: str) -> None:
        agent = await self.agent(agent_id)
        dep = await self.deployment(agent, deployment)
        dep.version, dep.updated_at = version, time.time()
        await self.repo.save(dep)
        self.dispatch.routing.set_weights(agent.name, {version: 100}, deployment)

    async def set_weights(self, agent_id: str, deployment: str, weights: dict[str, float]) -> None:
        agent = await self.agent(agent_id)
        self.dispatch.routing.set_weights(agent.name, weights, deployment)

    async def drain_instances(self, instance_ids: list[str]) -> None:
        await self.instances.drain_ids(instance_ids)

    def restarts(self, instance_ids: list[str]) -> int:
        return self.instances.restarts(instance_ids)

    async def analysis_context(
        self, agent_id: str, deployment: str, version: str, stable: str
    ) -> Context:
        """The names a canary's analysis checks take; commands run in the version's folder."""
        return Context(
            agent=(await self.agent(agent_id)).name,
            deployment=deployment,
            version=version,
            stable_version=stable,
            workdir=str(self.paths.source(agent_id, version)),
        )

    async def windows(self, agent_id: str, a: str, b: str, since: float) -> tuple[Window, Window]:
        name = (await self.agent(agent_id)).name
        stats = self.dispatch.stats
        return stats.window(name, a, since), stats.window(name, b, since)

    async def smoke_test(
        self, agent_id: str, deployment: str, version: str, instance_ids: list[str], test: SmokeTest
    ) -> str | None:
        return await smoke_test(self, agent_id, deployment, version, instance_ids, test)

    async def drain_others(
        self, agent_id: str, deployment: str, keep: list[str], warm: bool = True
    ) -> list[str]:
        """Instances of `deployment` other than `keep` stop taking sessions. Other versions'
        retire (kept warm for a rollback) or, with `warm=False`, drain now."""
        agent = await self.agent(agent_id)
        serving = (await self.deployment(agent, deployment)).version
        return await self.instances.retire_others(agent, deployment, serving, keep, warm)

    async def give_up(self, rollout: RolloutRow, instance_ids: list[str]) -> None:
        agent = await self.agent(rollout.agent_id)
        serving = (await self.deployment(agent, rollout.deployment)).version
        await self.instances.give_up(agent, serving, instance_ids, rollout.created_at)

    # -- secrets ------------------------------------------------------------------------------

    async def set_secrets(self, agent: AgentRow, values: Mapping[str, str]) -> list[str]:
        for name in values:
            if not name or not (name.replace("_", "a").isalnum()) or name[0].isdigit():
                raise InvalidRequest(f"secret name '{name}' must be a valid environment variable")
            if "\x00" in values[name]:
                raise InvalidRequest(f"secret {name}: an environment variable cannot hold a NUL")
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


def strategy_plan(plan: dict[str, Any] | None) -> dict[str, Any]:
    """A rollout's plan, checked and with defaults filled in; rolling when none is given."""
    plan = dict(plan or {})
    strategy = plan.get("strategy", "rolling")
    if strategy == "rolling":
        return {"strategy": "rolling"}
    if strategy == "canary":
        return CanaryPlan.from_dict(plan).to_dict()
    if strategy == "bluegreen":
        return SmokeTest.from_plan(plan).to_dict()
    raise InvalidRequest(f"unknown strategy '{strategy}' (rolling, canary or bluegreen)")


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
