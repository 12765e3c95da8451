"""The Kubernetes runtime against a real control plane with kwok's fake nodes (tests/kube.py).

kwok makes a pod Running and Ready at once and runs no container, so no worker registers: these
tests hold the runtime to its protocol (start, statuses from the watch, drain, stop, adopt) and
to the pods and Secrets it makes. Each test has a namespace of its own, with the Role of
deploy/kubernetes/rbac.yaml bound to a user of its own, and runs the runtime as that user: the
manifest is exactly what the runtime needs.

Skipped when the binaries are not built (`scripts/peers kube`)."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.models.rbac_v1 import PolicyRule, RoleRef, Subject
from lightkube.resources.core_v1 import Pod, PodStatus, Secret
from lightkube.resources.rbac_authorization_v1 import ClusterRole, RoleBinding
from typer.testing import CliRunner

from tests.kube import Cluster, admin, free_ports, kube_cluster, make_namespace, require_binaries
from voicefleet.cli.main import app as cli
from voicefleet.runtime import InstanceSpec, InstanceStatus
from voicefleet.runtime.kubernetes import (
    INSTANCE_ID,
    KubernetesError,
    KubernetesRuntime,
    check_access,
    connect,
    pod_name,
)

ROOT = Path(__file__).resolve().parent.parent
RBAC_GROUP = "rbac.authorization.k8s.io"
IMAGE = "example.invalid/agent:v1"  # kwok runs nothing: never pulled
SECRET_VALUE = "sk-not-in-any-pod-spec"
FILE_SECRET = b"-----BEGIN KEY-----\nfile content\n"
_namespaces = itertools.count()
_users = itertools.count()


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_binaries()
    with kube_cluster(tmp_path_factory.mktemp("kube"), nodes=2) as cluster:
        yield cluster


async def runtime_for(
    kube: Cluster, backoff_initial: float = 1.0
) -> tuple[KubernetesRuntime, str, Path]:
    """A runtime as a user bound only to the manifest's Role, in a namespace of its own."""
    user = f"voicefleet-{next(_users)}"
    ns = await make_namespace(kube, user)
    kubeconfig = kube.kubeconfig_for(user)
    runtime = KubernetesRuntime(connect(kubeconfig, ns), backoff_initial=backoff_initial)
    return runtime, ns, kubeconfig


def spec(
    tmp_path: Path, n: int, grace: float = 30.0, files: dict[str, bytes] | None = None
) -> InstanceSpec:
    return InstanceSpec(
        instance_id=f"Bot_{n}-v1-0123456789ab",
        agent_id="CA_bot",
        version="v1",
        workdir=tmp_path,
        python=Path("python"),
        env={
            "OPENAI_API_KEY": SECRET_VALUE,
            "LIVEKIT_API_KEY": "vf/CA_bot/v1",
            "LIVEKIT_API_SECRET": SECRET_VALUE + "-worker",
            "LIVEKIT_URL": "ws://voicefleet.example:7880",
            "VOICEFLEET_GRACE_PERIOD": str(int(grace)),
        },
        log_dir=tmp_path / "logs",
        grace_period=grace,
        deployment="production",
        image=IMAGE,
        files=files or {},
    )


class Changes:
    """What the runtime reported to its listeners, in order, and a wait for the next."""

    def __init__(self, runtime: KubernetesRuntime) -> None:
        self.seen: list[tuple[str, InstanceStatus]] = []
        self._changed = asyncio.Event()
        runtime.on_change(self._on_change)

    def _on_change(self, instance_id: str, status: InstanceStatus) -> None:
        self.seen.append((instance_id, status))
        self._changed.set()

    def of(self, instance_id: str) -> list[InstanceStatus]:
        return [s for i, s in self.seen if i == instance_id]

    async def until(
        self, instance_id: str, status: InstanceStatus, times: int = 1, timeout: float = 15
    ) -> None:
        """Until `status` was reported `times` times for the instance."""

        async def reported() -> None:
            while self.of(instance_id).count(status) < times:
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(reported(), timeout)
        except TimeoutError:
            pytest.fail(f"{instance_id} not {status} after {timeout}s: {self.of(instance_id)}")


async def test_started_instances_are_ready_through_the_watch_as_pods_with_secrets_and_probe(
    kube: Cluster, tmp_path: Path
) -> None:
    runtime, ns, _ = await runtime_for(kube)
    changes = Changes(runtime)
    try:
        mounted = {"creds.json": FILE_SECRET}  # `--secret-mount`: the second instance's
        specs = [spec(tmp_path, 1, grace=45), spec(tmp_path, 2, grace=45, files=mounted)]
        for s in specs:
            state = await runtime.start(s)
            assert state.status in (InstanceStatus.STARTING, InstanceStatus.READY)
        for s in specs:
            await changes.until(s.instance_id, InstanceStatus.READY)
            # Starting is the state it is created in (as the local runtime's): not reported.
            assert changes.of(s.instance_id) == [InstanceStatus.READY]
        async with admin(kube, ns) as client:
            for s in specs:
                name = pod_name(s.instance_id)
                pod = await client.get(Pod, name)
                assert pod.metadata and pod.spec
                assert pod.metadata.labels == {
                    "app.kubernetes.io/managed-by": "voicefleet",
                    "voicefleet.io/agent": "CA_bot",
                    "voicefleet.io/deployment": "production",
                    "voicefleet.io/version": "v1",
                    "voicefleet.io/instance": name,
                }
                assert (pod.metadata.annotations or {})[INSTANCE_ID] == s.instance_id
                assert pod.spec.terminationGracePeriodSeconds == 45
                assert pod.spec.automountServiceAccountToken is False
                (container,) = pod.spec.containers
                assert container.image == IMAGE
                assert container.command == ["python", "agent.py", "start"]
                probe = container.readinessProbe
                assert probe and probe.httpGet and probe.httpGet.path == "/"
                assert probe.httpGet.port == "health"
                assert [(p.name, p.containerPort) for p in container.ports or []] == [
                    ("health", 8081)
                ]
                env = {e.name: e for e in container.env or []}
                assert env["LIVEKIT_URL"].value == "ws://voicefleet.example:7880"
                for hidden in ("OPENAI_API_KEY", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"):
                    ref = env[hidden].valueFrom
                    assert env[hidden].value is None and ref and ref.secretKeyRef
                    assert (ref.secretKeyRef.name, ref.secretKeyRef.key) == (name, hidden)
                assert SECRET_VALUE not in str(pod.to_dict())
                secret = await client.get(Secret, name)
                assert secret.metadata and secret.data and "OPENAI_API_KEY" in secret.data
                (owner,) = secret.metadata.ownerReferences or []
                assert (owner.kind, owner.name, owner.uid) == ("Pod", name, pod.metadata.uid)
                if not s.files:
                    assert not pod.spec.volumes and "VOICEFLEET_SECRETS_DIR" not in env
                    continue
                # A file secret: in the instance's Secret, mounted read-only, owner-only, at
                # /etc/secrets (where LiveKit Cloud puts them), named by the variable.
                assert base64.b64decode(secret.data["file.creds.json"]) == FILE_SECRET
                assert env["VOICEFLEET_SECRETS_DIR"].value == "/etc/secrets"
                (volume,) = pod.spec.volumes or []
                assert volume.secret and volume.secret.secretName == name
                assert volume.secret.defaultMode == 0o400
                assert [(i.key, i.path) for i in volume.secret.items or []] == [
                    ("file.creds.json", "creds.json")
                ]
                (mount,) = container.volumeMounts or []
                assert (mount.name, mount.mountPath, mount.readOnly) == (
                    volume.name,
                    "/etc/secrets",
                    True,
                )
                assert b"BEGIN KEY" not in json.dumps(pod.to_dict()).encode()
                assert runtime.get(s.instance_id).status == InstanceStatus.READY  # type: ignore[union-attr]
    finally:
        await runtime.close(leave_running=False)


async def test_a_drain_deletes_the_pod_with_the_grace_given_and_reports_stopped(
    kube: Cluster, tmp_path: Path
) -> None:
    runtime, ns, _ = await runtime_for(kube)
    changes = Changes(runtime)
    graces: list[int | None] = []
    try:
        drained, kept = spec(tmp_path, 1), spec(tmp_path, 2)
        for s in (drained, kept):
            await runtime.start(s)
            await changes.until(s.instance_id, InstanceStatus.READY)
        async with admin(kube, ns) as client:
            name = pod_name(drained.instance_id)
            before = await client.get(Pod, name)
            assert before.metadata is not None
            version = before.metadata.resourceVersion

            async def deletion_grace() -> None:
                # From the pod as it was: the deletion is among the events, however late the
                # watch's request reaches the server.
                async for _, pod in client.watch(
                    Pod, namespace=ns, fields={"metadata.name": name}, resource_version=version
                ):
                    if pod.metadata and pod.metadata.deletionTimestamp is not None:
                        graces.append(pod.metadata.deletionGracePeriodSeconds)
                        return

            watching = asyncio.create_task(deletion_grace())
            await runtime.drain(drained.instance_id, grace=7)
            await changes.until(drained.instance_id, InstanceStatus.STOPPED)
            await asyncio.wait_for(watching, 10)
        assert graces == [7]
        assert changes.of(drained.instance_id)[-2:] == [
            InstanceStatus.DRAINING,
            InstanceStatus.STOPPED,
        ]
        assert runtime.get(kept.instance_id).status == InstanceStatus.READY  # type: ignore[union-attr]
        await runtime.stop(kept.instance_id)
        assert changes.of(kept.instance_id)[-1] == InstanceStatus.STOPPED
        async with admin(kube, ns) as client:
            assert [p async for p in client.list(Pod)] == []
    finally:
        await runtime.close(leave_running=False)


async def test_a_runtime_started_again_adopts_the_running_pod_and_follows_it(
    kube: Cluster, tmp_path: Path
) -> None:
    runtime, ns, kubeconfig = await runtime_for(kube)
    changes = Changes(runtime)
    running, never = spec(tmp_path, 1), spec(tmp_path, 2)
    await runtime.start(running)
    await changes.until(running.instance_id, InstanceStatus.READY)
    await runtime.close(leave_running=True)  # the server stops; its pods go on

    again = KubernetesRuntime(connect(kubeconfig, ns))
    later = Changes(again)
    try:
        state = await again.adopt(running, 0, 0.0)
        assert state is not None and state.status == InstanceStatus.READY
        assert await again.adopt(never, 0, 0.0) is None
        assert again.get(never.instance_id) is None
        await again.drain(running.instance_id, grace=5)
        await later.until(running.instance_id, InstanceStatus.STOPPED)
    finally:
        await again.close(leave_running=False)


async def test_a_pod_deleted_by_hand_is_reported_failed_and_created_again(
    kube: Cluster, tmp_path: Path
) -> None:
    runtime, ns, _ = await runtime_for(kube, backoff_initial=0.2)
    changes = Changes(runtime)
    try:
        s = spec(tmp_path, 1)
        await runtime.start(s)
        await changes.until(s.instance_id, InstanceStatus.READY)
        name = pod_name(s.instance_id)
        async with admin(kube, ns) as client:
            first = await client.get(Pod, name)
            await client.delete(Pod, name)
            await changes.until(s.instance_id, InstanceStatus.FAILED)
            state = runtime.get(s.instance_id)
            assert state is not None and state.restarts == 1
            # Made again under its name, with a Secret of its own again, and ready again.
            await changes.until(s.instance_id, InstanceStatus.READY, times=2)
            second = await client.get(Pod, name)
            assert first.metadata and second.metadata
            assert second.metadata.uid != first.metadata.uid
            secret = await client.get(Secret, name)
            assert secret.metadata and secret.metadata.ownerReferences
            assert secret.metadata.ownerReferences[0].uid == second.metadata.uid
        assert changes.of(s.instance_id) == [
            InstanceStatus.READY,
            InstanceStatus.FAILED,
            InstanceStatus.STARTING,
            InstanceStatus.READY,
        ]
    finally:
        await runtime.close(leave_running=False)


async def test_a_crashed_container_is_failed_with_the_kubelets_restart_count(
    kube: Cluster, tmp_path: Path
) -> None:
    runtime, ns, _ = await runtime_for(kube)
    changes = Changes(runtime)
    try:
        s = spec(tmp_path, 1)
        await runtime.start(s)
        await changes.until(s.instance_id, InstanceStatus.READY)
        crashed = {
            "status": {
                "conditions": [{"type": "Ready", "status": "False"}],
                "containerStatuses": [
                    {
                        "name": "agent",
                        "image": IMAGE,
                        "imageID": "",
                        "ready": False,
                        "restartCount": 2,
                        "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                        "lastState": {"terminated": {"exitCode": 3, "reason": "Error"}},
                    }
                ],
            }
        }
        async with admin(kube, ns) as client:  # what the kubelet would write
            await client.patch(PodStatus, pod_name(s.instance_id), crashed)
        await changes.until(s.instance_id, InstanceStatus.FAILED)
        state = runtime.get(s.instance_id)
        assert state is not None and (state.restarts, state.last_exit) == (2, 3)
    finally:
        await runtime.close(leave_running=False)


def unreachable_kubeconfig(path: Path) -> tuple[Path, int]:
    """A kubeconfig for an API server on a port where nothing listens."""
    (port,) = free_ports(1)
    path.write_text(
        '{"apiVersion": "v1", "kind": "Config", "current-context": "c",'
        f'"clusters": [{{"name": "k", "cluster": {{"server": "https://127.0.0.1:{port}"}}}}],'
        '"users": [{"name": "u", "user": {"token": "t"}}],'
        '"contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}]}'
    )
    return path, port


async def test_an_unreachable_api_server_is_one_clear_error(tmp_path: Path) -> None:
    kubeconfig, port = unreachable_kubeconfig(tmp_path / "kubeconfig")
    client = connect(kubeconfig, "vf")
    where = f"cannot reach the Kubernetes API server at https://127.0.0.1:{port}"
    with pytest.raises(KubernetesError, match=where):
        await check_access(client)
    runtime = KubernetesRuntime(client)
    with pytest.raises(KubernetesError, match=where):  # at once, not after the sync timeout
        await asyncio.wait_for(runtime.start(spec(tmp_path, 1)), 5)
    await runtime.close(leave_running=True)


def test_vf_server_on_kubernetes_stops_at_start_with_one_line_when_it_cannot_connect(
    tmp_path: Path,
) -> None:
    kubeconfig, port = unreachable_kubeconfig(tmp_path / "kubeconfig")
    data = f"--data-dir={tmp_path / 'data'}"
    out = CliRunner().invoke(
        cli, ["server", "--runtime", "kubernetes", f"--kubeconfig={kubeconfig}", data]
    )
    assert out.exit_code == 2, out.output
    assert out.output.strip().splitlines() == [
        f"error: cannot reach the Kubernetes API server at https://127.0.0.1:{port}: "
        "All connection attempts failed"
    ]
    missing = CliRunner().invoke(
        cli, ["server", "--runtime", "kubernetes", f"--kubeconfig={tmp_path / 'none'}", data]
    )
    assert missing.exit_code == 2
    assert "error: no usable Kubernetes configuration" in missing.output


async def test_a_user_without_the_role_is_told_which_permissions_are_missing(
    kube: Cluster, tmp_path: Path
) -> None:
    ns = await make_namespace(kube)  # the Role, bound to nobody here
    bound = kube.kubeconfig_for("bound-user")
    async with admin(kube, ns) as client:  # pods only: secrets missing
        pods_only = ClusterRole(
            metadata=ObjectMeta(name="pods-only"),
            rules=[PolicyRule(apiGroups=[""], resources=["pods"], verbs=["*"])],
        )
        await client.create(pods_only)
        await client.create(
            RoleBinding(
                metadata=ObjectMeta(name="pods-only"),
                roleRef=RoleRef(apiGroup=RBAC_GROUP, kind="ClusterRole", name="pods-only"),
                subjects=[Subject(kind="User", name="bound-user", apiGroup=RBAC_GROUP)],
            )
        )

    nobody = connect(kube.kubeconfig_for("nobody"), ns)
    with pytest.raises(KubernetesError) as denied:
        await check_access(nobody)
    message = str(denied.value)
    assert "\n" not in message
    assert message.startswith(
        f"missing RBAC permissions in namespace {ns}: list pods, watch pods, create pods, "
        "delete pods, create secrets, patch secrets, delete secrets;"
    ), message
    assert "deploy/kubernetes/rbac.yaml" in message
    runtime = KubernetesRuntime(nobody, sync_timeout=2.0)
    with pytest.raises(KubernetesError, match="missing RBAC permission to list and watch pods"):
        await runtime.start(spec(tmp_path, 1))
    await runtime.close(leave_running=True)

    partial = connect(bound, ns)
    with pytest.raises(
        KubernetesError, match=f"{ns}: create secrets, patch secrets, delete secrets;"
    ):
        await check_access(partial)
    runtime = KubernetesRuntime(partial)
    with pytest.raises(KubernetesError) as refused:
        await runtime.start(spec(tmp_path, 1))
    assert "missing RBAC permission to create the pod" in str(refused.value)
    assert 'cannot create resource "secrets"' in str(refused.value)
    await runtime.close(leave_running=True)

    ok_runtime, _, _ = await runtime_for(kube)
    await check_access(ok_runtime.client)  # the manifest's Role is enough
    await ok_runtime.close(leave_running=True)
