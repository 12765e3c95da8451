"""The Kubernetes runtime: each instance is a Pod that voicefleet creates and deletes itself.

No Deployment or ReplicaSet stands between: a scale-down or a drain deletes exactly the pods
chosen, with the grace period chosen (Kubernetes sends SIGTERM, livekit-agents finishes its
sessions, SIGKILL comes at the grace's end). What the local runtime's restart does, the kubelet
does here: a crashed container is restarted in place (restartPolicy Always, its restartCount is
the instance's restarts); a pod deleted by someone else (by hand, evicted) is created again, with
backoff, under the same name.

One task watches the pods voicefleet manages in the namespace: it lists them, then watches from
the list's resourceVersion, and lists again only after the watch failed (an informer). Its cache
is the one place a pod's state lives; every status change comes from its events, none from
polling. An instance's environment is split: voicefleet's own public settings inline, everything
else (the agent's secrets, the worker's credentials) in a Secret of the instance's own, owned by
its pod so that Kubernetes removes it with the pod.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
from lightkube import ApiError, AsyncClient, ConfigError, KubeConfig
from lightkube.core.client import LabelSelector
from lightkube.models.authorization_v1 import ResourceAttributes, SelfSubjectAccessReviewSpec
from lightkube.models.core_v1 import (
    Container,
    ContainerPort,
    ContainerStatus,
    EnvVar,
    EnvVarSource,
    HTTPGetAction,
    KeyToPath,
    PodSpec,
    Probe,
    ResourceRequirements,
    SecretKeySelector,
    SecretVolumeSource,
    Volume,
    VolumeMount,
)
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.authorization_v1 import SelfSubjectAccessReview
from lightkube.resources.core_v1 import Pod, Secret

from voicefleet.errors import VoicefleetError
from voicefleet.runtime import (
    SECRETS_ENV,
    SECRETS_MOUNT,
    InstanceSpec,
    InstanceState,
    InstanceStatus,
)
from voicefleet.runtime.base import RuntimeBase

log = logging.getLogger("voicefleet.runtime")

MANAGED_BY = "app.kubernetes.io/managed-by"
AGENT, DEPLOYMENT = "voicefleet.io/agent", "voicefleet.io/deployment"
VERSION, INSTANCE = "voicefleet.io/version", "voicefleet.io/instance"
INSTANCE_ID = "voicefleet.io/instance-id"  # annotation: the id exactly (labels are sanitized)
SELECTOR: LabelSelector = {MANAGED_BY: "voicefleet"}
CONTAINER = "agent"
# livekit-agents' health server (`python agent.py start`: port 8081, all interfaces). Each pod
# has a network of its own, so the port the local runtime must move is free here.
HEALTH_PORT = 8081
# File secrets live in the instance's Secret beside its variables, under keys of their own.
FILE_KEY = "file.{name}"
DEFAULT_COMMAND = ("python", "{entry}", "start")
# Set by voicefleet for every instance and secret to nobody: inline in the pod spec. Any other
# variable (the agent's secrets, the worker's key and secret) goes into the instance's Secret.
PUBLIC_ENV = frozenset({
    "LIVEKIT_URL", "VOICEFLEET_URL", "PYTHONPATH", "LIVEKIT_AGENT_DEPLOYMENT",
    "LIVEKIT_AGENT_NAME_OVERRIDE", "VOICEFLEET_AGENT_ID", "VOICEFLEET_VERSION",
    "VOICEFLEET_INSTANCE_ID", "VOICEFLEET_GRACE_PERIOD", "VOICEFLEET_FLAGS_CACHE",
})  # fmt: skip
# What the runtime does with the API, checked before the server starts (deploy/kubernetes/
# rbac.yaml grants exactly this).
PERMISSIONS = (
    ("list", "pods"), ("watch", "pods"), ("create", "pods"), ("delete", "pods"),
    ("create", "secrets"), ("patch", "secrets"), ("delete", "secrets"),
)  # fmt: skip
RBAC_HINT = "bind the Role in deploy/kubernetes/rbac.yaml"
# A container waiting for one of these will not start without someone changing something.
STUCK = frozenset({
    "ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
    "CreateContainerError", "RunContainerError",
})  # fmt: skip
# How a drained worker may end without having failed: exited, or ended by SIGTERM or SIGKILL.
CLEAN_EXITS = frozenset({0, 137, 143})


class KubernetesError(VoicefleetError):
    """The API server cannot be reached, refused a request, or the configuration is missing."""

    status = 503
    twirp_code = "unavailable"


def explain(e: Exception, doing: str, namespace: str) -> KubernetesError:
    """One line a user can act on, for an error of the API or of the connection to it."""
    if isinstance(e, ApiError):
        code, message = e.status.code, e.status.message or e.status.reason or ""
        if code == 403:
            return KubernetesError(
                f"missing RBAC permission to {doing} in namespace {namespace}: {message}; "
                + RBAC_HINT
            )
        if code == 401:
            return KubernetesError(f"the Kubernetes API server refused the credentials: {message}")
        return KubernetesError(f"cannot {doing} in namespace {namespace}: {message} ({code})")
    if isinstance(e, httpx2.TransportError):
        where = ""
        if _has_request(e):
            url = e.request.url
            where = f" at {url.scheme}://{url.netloc.decode()}"
        reason = str(e) or type(e).__name__
        return KubernetesError(f"cannot reach the Kubernetes API server{where}: {reason}")
    return KubernetesError(f"cannot {doing} in namespace {namespace}: {e!r}")


def _has_request(e: httpx2.TransportError) -> bool:
    try:
        e.request  # noqa: B018 (raises when the error has no request)
    except RuntimeError:
        return False
    return True


def connect(kubeconfig: Path | None = None, namespace: str | None = None) -> AsyncClient:
    """A client from `kubeconfig`, else the pod's service account (in a cluster), else
    $KUBECONFIG or ~/.kube/config. `namespace`: else the context's (or the pod's own)."""
    try:
        config = KubeConfig.from_file(kubeconfig) if kubeconfig else KubeConfig.from_env()
        return AsyncClient(config, namespace=namespace, field_manager="voicefleet")
    except (ConfigError, OSError, KeyError, ValueError) as e:
        where = str(kubeconfig) if kubeconfig else "in-cluster, $KUBECONFIG or ~/.kube/config"
        raise KubernetesError(f"no usable Kubernetes configuration ({where}): {e}") from None


async def check_access(client: AsyncClient) -> None:
    """The API server answers and lets this user do all the runtime does in its namespace;
    else one KubernetesError naming every missing permission."""
    namespace = client.namespace
    missing = []
    for verb, resource in PERMISSIONS:
        review = SelfSubjectAccessReview(
            spec=SelfSubjectAccessReviewSpec(
                resourceAttributes=ResourceAttributes(
                    verb=verb, resource=resource, namespace=namespace
                )
            )
        )
        try:
            answer = await client.create(review)
        except (ApiError, httpx2.TransportError) as e:
            raise explain(e, "review its permissions", namespace) from None
        if not (answer.status and answer.status.allowed):
            missing.append(f"{verb} {resource}")
    if missing:
        raise KubernetesError(
            f"missing RBAC permissions in namespace {namespace}: {', '.join(missing)}; " + RBAC_HINT
        )


# -- names and the pod spec -------------------------------------------------------------------


def pod_name(instance_id: str) -> str:
    """A DNS label (a pod's name, and a label value) for the instance id; a short digest of
    the id keeps two ids that sanitize alike apart."""
    name = re.sub(r"[^a-z0-9-]+", "-", instance_id.lower()).strip("-")
    if name == instance_id and len(name) <= 63:
        return name
    digest = hashlib.sha256(instance_id.encode()).hexdigest()[:8]
    return f"{name[:54].rstrip('-')}-{digest}".lstrip("-")


def label_value(value: str) -> str:
    value = re.sub(r"[^A-Za-z0-9_.-]+", "-", value)[:63]
    return value.strip("-_.")


def observe(pod: Pod) -> tuple[InstanceStatus, int, int | None]:
    """What a pod says of its instance: (status, restarts, last exit code). A pure reading of
    one pod; the runtime decides what to report from it and from what it did itself."""
    meta, status = pod.metadata, pod.status
    agent: ContainerStatus | None = None
    if status is not None:
        agent = next((c for c in status.containerStatuses or [] if c.name == CONTAINER), None)
    restarts, last_exit = (agent.restartCount if agent else 0), None
    crashed = stuck = False
    if agent is not None:
        ended = (agent.state.terminated if agent.state else None) or (
            agent.lastState.terminated if agent.lastState else None
        )
        last_exit = ended.exitCode if ended else None
        waiting = agent.state.waiting if agent.state else None
        crashed = bool(agent.state and agent.state.terminated) or bool(
            waiting and agent.lastState and agent.lastState.terminated
        )
        stuck = bool(waiting and waiting.reason in STUCK)
    if meta is not None and meta.deletionTimestamp is not None:
        return InstanceStatus.DRAINING, restarts, last_exit
    if (status is not None and status.phase in ("Failed", "Succeeded")) or crashed or stuck:
        return InstanceStatus.FAILED, restarts, last_exit
    ready = any(
        c.type == "Ready" and c.status == "True"
        for c in (status.conditions if status else None) or []
    )
    return (InstanceStatus.READY if ready else InstanceStatus.STARTING), restarts, last_exit


def split_env(env: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(inline, secret): voicefleet's public settings, and everything else."""
    public = {k: v for k, v in env.items() if k in PUBLIC_ENV}
    return public, {k: v for k, v in env.items() if k not in PUBLIC_ENV}


@dataclass(eq=False)
class _Instance:
    state: InstanceState
    pod: str  # its pod's name, and its Secret's
    uid: str = ""  # the current pod's: events of an earlier pod of that name are not its own
    draining: bool = False
    stopping: bool = False
    gone: asyncio.Event = field(default_factory=asyncio.Event)  # its pod is deleted
    restarts_before: int = 0  # restarts of its earlier pods (deleted by someone else)
    backoff: float = 0.0
    again: asyncio.Task[None] | None = None  # creating its pod again


class KubernetesRuntime(RuntimeBase[_Instance]):
    def __init__(
        self,
        client: AsyncClient,
        *,
        command: Sequence[str] | None = DEFAULT_COMMAND,
        resources: ResourceRequirements | None = None,
        stop_timeout: float = 10.0,
        backoff_initial: float = 1.0,
        backoff_max: float = 30.0,
        sync_timeout: float = 30.0,
    ) -> None:
        """`command`: the container's, with "{entry}" for the agent's file; None: the image's
        own. `resources`: requests and limits of every instance's container."""
        super().__init__()
        self.client, self.namespace = client, client.namespace
        self.command, self.resources = command, resources
        self.stop_timeout, self.sync_timeout = stop_timeout, sync_timeout
        self.backoff_initial, self.backoff_max = backoff_initial, backoff_max
        self._by_pod: dict[str, _Instance] = {}
        self._pods: dict[str, Pod] = {}  # the watch's cache: voicefleet's pods, by name
        self._synced = asyncio.Event()
        self._tried = asyncio.Event()  # the first list was answered, or failed
        self._watch_error: KubernetesError | None = None
        self._watcher: asyncio.Task[None] | None = None

    @classmethod
    def from_config(
        cls, kubeconfig: Path | None = None, namespace: str | None = None
    ) -> KubernetesRuntime:
        return cls(connect(kubeconfig, namespace))

    # -- the watch ----------------------------------------------------------------------------

    async def _ready(self) -> None:
        """The watch runs and has listed the pods once (started on first use)."""
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._watch())
        if self._synced.is_set():
            return
        # Until the first list's answer: a refusal or no connection is told at once; the
        # watch goes on trying, so a later call may find it listed.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._tried.wait(), self.sync_timeout)
        if not self._synced.is_set():
            raise self._watch_error or KubernetesError(
                f"no answer from the Kubernetes API server in {self.sync_timeout:g}s"
            )

    async def _watch(self) -> None:
        backoff = 0.5
        while True:
            try:
                listing = self.client.list(Pod, namespace=self.namespace, labels=SELECTOR)
                listed = {p.metadata.name: p async for p in listing if p.metadata}
                self._relisted(listed)
                self._synced.set()
                self._tried.set()
                self._watch_error, backoff = None, 0.5
                async for op, pod in self.client.watch(
                    Pod,
                    namespace=self.namespace,
                    labels=SELECTOR,
                    resource_version=listing.resourceVersion,
                ):
                    self._event(op, pod)
            except (ApiError, httpx2.HTTPError) as e:
                # 410 Gone included: the watch fell too far behind. Listing again catches up.
                self._watch_error = explain(e, "list and watch pods", self.namespace)
                log.warning("pod watch failed; listing again in %gs: %s", backoff, e)
            except Exception as e:
                self._watch_error = explain(e, "list and watch pods", self.namespace)
                log.exception("pod watch failed; listing again in %gs", backoff)
            self._tried.set()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    def _relisted(self, listed: dict[str | None, Pod]) -> None:
        """A fresh list: pods that went while the watch was down are deleted for us too."""
        for name in set(self._pods) - set(listed):
            self._event("DELETED", self._pods[name])
        for pod in listed.values():
            self._event("MODIFIED", pod)

    def _event(self, op: str, pod: Pod) -> None:
        if pod.metadata is None or pod.metadata.name is None:
            return
        name = pod.metadata.name
        if op == "DELETED":
            self._pods.pop(name, None)
        else:
            self._pods[name] = pod
        inst = self._by_pod.get(name)
        if inst is None or (inst.uid and pod.metadata.uid != inst.uid):
            return  # not followed here, or an earlier pod of that name
        self._observed(inst, None if op == "DELETED" else pod, pod)

    def _observed(self, inst: _Instance, pod: Pod | None, last: Pod) -> None:
        """Report what the pod's latest state means; `pod` None: it is deleted (`last`: its
        final state)."""
        status, restarts, last_exit = observe(last)
        if last_exit is not None:
            inst.state.last_exit = last_exit
        if pod is None:
            inst.gone.set()
            if inst.draining or inst.stopping:
                if inst.draining and last_exit not in (None, *CLEAN_EXITS):
                    self._set(inst, InstanceStatus.FAILED)  # died mid-drain: not our doing
                self._set(inst, InstanceStatus.STOPPED)
                return
            # Deleted by someone else (by hand, evicted): like a crash, it is made again.
            inst.state.restarts = inst.restarts_before = inst.restarts_before + restarts + 1
            self._set(inst, InstanceStatus.FAILED)
            log.warning(
                "instance's pod deleted; creating it again",
                extra={"instance": inst.state.spec.instance_id, "in": inst.backoff},
            )
            inst.again = asyncio.create_task(self._create_again(inst))
            return
        restarts += inst.restarts_before
        if restarts > inst.state.restarts:
            inst.state.restarts = restarts
            self._set(inst, InstanceStatus.FAILED)  # even if it is up again already
        if status == InstanceStatus.DRAINING and not (inst.draining or inst.stopping):
            return  # deleted by someone else: reported when it is gone
        if status == InstanceStatus.STARTING and inst.state.status == InstanceStatus.READY:
            # Not ready any more (its probe failing): as the local runtime, it stays READY
            # (the dispatcher goes by the worker's own connection), with a warning.
            log.warning("instance unhealthy", extra={"instance": inst.state.spec.instance_id})
            return
        if status == InstanceStatus.READY:
            inst.backoff = self.backoff_initial
        self._set(inst, status)

    # -- starting -----------------------------------------------------------------------------

    async def start(self, spec: InstanceSpec) -> InstanceState:
        if not spec.image:
            raise KubernetesError(
                f"version {spec.version} of agent {spec.agent_id} has no image: the Kubernetes "
                "runtime runs container images"
            )
        await self._ready()
        inst = _Instance(InstanceState(spec=spec), pod_name(spec.instance_id))
        inst.backoff = self.backoff_initial
        await self._create(inst)
        return inst.state

    async def _create(self, inst: _Instance, again: bool = False) -> None:
        spec = inst.state.spec
        public, hidden = split_env(spec.env)
        if spec.files:
            public[SECRETS_ENV] = SECRETS_MOUNT
        try:
            if again:  # the earlier pod's Secret, if Kubernetes has not removed it yet
                with contextlib.suppress(ApiError):
                    await self.client.delete(Secret, inst.pod, namespace=self.namespace)
            if hidden or spec.files:
                secret = Secret(
                    metadata=self._meta(inst),
                    stringData=hidden,
                    data={
                        FILE_KEY.format(name=n): base64.b64encode(c).decode()
                        for n, c in spec.files.items()
                    },
                    type="Opaque",
                )
                await self.client.create(secret)
            try:
                pod = await self.client.create(self._pod(inst, public, hidden))
            except BaseException:
                if hidden or spec.files:
                    with contextlib.suppress(ApiError, httpx2.HTTPError):
                        await self.client.delete(Secret, inst.pod, namespace=self.namespace)
                raise
        except (ApiError, httpx2.HTTPError) as e:
            doing = f"create the pod of instance {spec.instance_id}"
            raise explain(e, doing, self.namespace) from None
        assert pod.metadata is not None and pod.metadata.uid is not None
        inst.uid = pod.metadata.uid
        inst.gone.clear()
        if pod.metadata.creationTimestamp is not None:
            inst.state.started_at = pod.metadata.creationTimestamp.timestamp()
        self._instances[spec.instance_id] = inst
        self._by_pod[inst.pod] = inst
        self._set(inst, InstanceStatus.STARTING)
        # The watch may have seen it already (events run while `create` awaited its answer).
        cached = self._pods.get(inst.pod)
        if cached is not None and cached.metadata and cached.metadata.uid == inst.uid:
            self._observed(inst, cached, cached)
        if hidden or spec.files:
            await self._own_secret(inst)
        log.info("pod created", extra={"instance": spec.instance_id, "pod": inst.pod})

    async def _own_secret(self, inst: _Instance) -> None:
        """The Secret goes with its pod: Kubernetes' garbage collector removes it then, even
        when the pod is deleted by someone else or while voicefleet is down."""
        owner = {"apiVersion": "v1", "kind": "Pod", "name": inst.pod, "uid": inst.uid}
        patch = {"metadata": {"ownerReferences": [owner]}}
        try:
            await self.client.patch(Secret, inst.pod, patch, namespace=self.namespace)
        except (ApiError, httpx2.HTTPError) as e:
            log.warning(
                "the instance's Secret will outlive its pod: %s",
                explain(e, "patch secrets", self.namespace),
                extra={"instance": inst.state.spec.instance_id},
            )

    async def _create_again(self, inst: _Instance) -> None:
        await asyncio.sleep(inst.backoff)
        inst.backoff = min(max(inst.backoff, self.backoff_initial) * 2, self.backoff_max)
        if inst.draining or inst.stopping:
            self._set(inst, InstanceStatus.STOPPED)
            return
        try:
            await self._create(inst, again=True)
        except KubernetesError as e:
            log.warning("instance's pod not created: %s", e, extra={"instance": inst.pod})
            inst.again = asyncio.create_task(self._create_again(inst))

    def _meta(self, inst: _Instance) -> ObjectMeta:
        spec = inst.state.spec
        labels = {
            MANAGED_BY: "voicefleet",
            AGENT: label_value(spec.agent_id),
            DEPLOYMENT: label_value(spec.deployment),
            VERSION: label_value(spec.version),
            INSTANCE: inst.pod,
        }
        return ObjectMeta(
            name=inst.pod,
            namespace=self.namespace,
            labels=labels,
            annotations={INSTANCE_ID: spec.instance_id},
        )

    def _pod(self, inst: _Instance, public: dict[str, str], hidden: dict[str, str]) -> Pod:
        spec = inst.state.spec
        env = [EnvVar(name=k, value=v) for k, v in public.items()]
        env += [
            EnvVar(
                name=k,
                valueFrom=EnvVarSource(secretKeyRef=SecretKeySelector(name=inst.pod, key=k)),
            )
            for k in hidden
        ]
        env.append(EnvVar(name="PYTHONUNBUFFERED", value="1"))
        command = [c.format(entry=spec.entry) for c in self.command] if self.command else None
        container = Container(
            name=CONTAINER,
            image=spec.image,
            command=command,
            env=env,
            ports=[ContainerPort(name="health", containerPort=HEALTH_PORT)],
            # Readiness only: a liveness probe would restart a busy worker mid-call.
            readinessProbe=Probe(
                httpGet=HTTPGetAction(path="/", port="health"),
                periodSeconds=2,
                timeoutSeconds=2,
                failureThreshold=3,
            ),
            resources=self.resources,
        )
        volumes = []
        if spec.files:  # read-only, owner-only files, gone with the pod
            volumes.append(
                Volume(
                    name="secrets",
                    secret=SecretVolumeSource(
                        secretName=inst.pod,
                        defaultMode=0o400,
                        items=[KeyToPath(key=FILE_KEY.format(name=n), path=n) for n in spec.files],
                    ),
                )
            )
            container.volumeMounts = [
                VolumeMount(name="secrets", mountPath=SECRETS_MOUNT, readOnly=True)
            ]
        return Pod(
            metadata=self._meta(inst),
            spec=PodSpec(
                containers=[container],
                volumes=volumes or None,
                restartPolicy="Always",
                terminationGracePeriodSeconds=_seconds(spec.grace_period),
                automountServiceAccountToken=False,  # agents have no business with the API
                enableServiceLinks=False,  # no variables for every service in the namespace
            ),
        )

    async def adopt(self, spec: InstanceSpec, pid: int, started_at: float) -> InstanceState | None:
        """Follow the pod a previous server created for this instance, if it still exists
        (`pid` and `started_at` are the local runtime's; a pod is found by its name)."""
        await self._ready()
        name = pod_name(spec.instance_id)
        pod = self._pods.get(name)
        meta = pod.metadata if pod else None
        if (
            pod is None
            or meta is None
            or (meta.annotations or {}).get(INSTANCE_ID) != spec.instance_id
        ):
            return None
        inst = _Instance(InstanceState(spec=spec), name, uid=meta.uid or "")
        inst.backoff = self.backoff_initial
        if meta.creationTimestamp is not None:
            inst.state.started_at = meta.creationTimestamp.timestamp()
        # As it is now, reported to nobody: the caller takes it as it finds it.
        status, inst.state.restarts, inst.state.last_exit = observe(pod)
        inst.state.status = status
        self._instances[spec.instance_id] = inst
        self._by_pod[name] = inst
        return inst.state

    # -- stopping -----------------------------------------------------------------------------

    async def drain(
        self, instance_id: str, grace: float | None = None, signalled: bool = False
    ) -> None:
        """Delete the pod with `grace` (Kubernetes: SIGTERM now, SIGKILL at its end). A pod
        already being deleted is left alone (`signalled` or not): a second deletion could
        shorten its grace, never lengthen it."""
        inst = self._instances.get(instance_id)
        if inst is None or inst.draining:
            return
        inst.draining = True
        if inst.gone.is_set():  # deleted by someone else, waiting to be created again: not now
            return
        self._set(inst, InstanceStatus.DRAINING)
        pod = self._pods.get(inst.pod)
        if pod is not None and pod.metadata and pod.metadata.deletionTimestamp is not None:
            return
        grace = inst.state.spec.grace_period if grace is None else grace
        await self._delete(inst, grace)

    async def stop(self, instance_id: str) -> None:
        """Delete the pod with a short grace (`stop_timeout`) and wait until it is gone."""
        inst = self._instances.get(instance_id)
        if inst is None:
            return
        inst.stopping = True
        if inst.again is not None:
            inst.again.cancel()
        if not inst.gone.is_set():
            await self._delete(inst, self.stop_timeout)
            try:
                await asyncio.wait_for(inst.gone.wait(), self.stop_timeout + 10.0)
            except TimeoutError:
                log.warning("pod not gone after its grace", extra={"instance": instance_id})
        self._set(inst, InstanceStatus.STOPPED)

    async def _delete(self, inst: _Instance, grace: float) -> None:
        try:
            await self.client.delete(
                Pod, inst.pod, namespace=self.namespace, grace_period=_seconds(grace)
            )
        except ApiError as e:
            if e.status.code != 404:
                raise explain(e, f"delete pod {inst.pod}", self.namespace) from None
            if inst.pod not in self._pods:  # gone before the watch said so: it says so soon
                inst.gone.set()
                self._set(inst, InstanceStatus.STOPPED)
        except httpx2.HTTPError as e:
            raise explain(e, f"delete pod {inst.pod}", self.namespace) from None
        log.info("pod deleted", extra={"instance": inst.state.spec.instance_id, "grace": grace})

    async def close(self, leave_running: bool) -> None:
        if not leave_running:
            await asyncio.gather(*(self.stop(i) for i in list(self._instances)))
        tasks = [i.again for i in self._instances.values() if i.again is not None]
        if self._watcher is not None:
            tasks.append(self._watcher)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.client.close()


def _seconds(grace: float) -> int:
    """A grace period in whole seconds, at least 1: 0 would remove the pod from the API at once
    without the kubelet stopping its container first."""
    return max(1, math.ceil(grace))
