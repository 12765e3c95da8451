"""The Kubernetes control plane the Kubernetes runtime will be tested against (tests/kube.py):
real etcd, kube-apiserver, kube-controller-manager and kube-scheduler, kwok's fake nodes. What
the runtime will rely on, seen through a watch as the runtime will see it: a Deployment's pods
become Running on the nodes, the ReplicaSet replaces a deleted pod, and a scale-down removes the
pod with the lowest `controller.kubernetes.io/pod-deletion-cost`.

Skipped when the binaries are not built (`scripts/peers kube`; CI's `.ci/run` builds them)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from lightkube import ApiError, AsyncClient, KubeConfig
from lightkube.core.client import LabelSelector
from lightkube.models import meta_v1
from lightkube.models.apps_v1 import DeploymentSpec
from lightkube.models.core_v1 import Container, PodSpec, PodTemplateSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import Node, Pod

from tests.kube import KWOK_NODE, Cluster, kube_cluster, require_binaries

NS = "default"
APP = "web"
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[Cluster]:
    require_binaries()
    with kube_cluster(tmp_path / "kube", nodes=2) as cluster:
        yield cluster


class PodWatch:
    """The pods of one label selector as a watch shows them (never polled): `pods` by name, as
    of the last event; `deleted`: the names a DELETED event removed."""

    def __init__(self, client: AsyncClient, labels: dict[str, str]) -> None:
        self.client = client
        self.labels: LabelSelector = dict(labels)
        self.pods: dict[str, Pod] = {}
        self.deleted: list[str] = []
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._error: Exception | None = None

    async def __aenter__(self) -> PodWatch:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        try:
            # From the start (no resourceVersion): the pods that exist come first, as ADDED.
            async for op, pod in self.client.watch(Pod, namespace=NS, labels=self.labels):
                assert pod.metadata is not None and pod.metadata.name is not None
                name = pod.metadata.name
                async with self._changed:
                    if op == "DELETED":
                        self.pods.pop(name, None)
                        self.deleted.append(name)
                    else:
                        self.pods[name] = pod
                    self._changed.notify_all()
        except Exception as e:
            async with self._changed:
                self._error = e
                self._changed.notify_all()

    async def until(self, what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
        """Wait for the next events until `check()` holds."""
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self._error is not None or check()), timeout
                )
            except TimeoutError:
                pytest.fail(f"{what}: not after {timeout:.0f}s; pods: {self.describe()}")
            if self._error is not None:
                raise AssertionError(f"the watch failed ({what})") from self._error

    def live(self) -> dict[str, Pod]:
        """The pods not being deleted."""
        return {
            n: p for n, p in self.pods.items() if p.metadata and not p.metadata.deletionTimestamp
        }

    def running(self) -> dict[str, Pod]:
        """Live pods Running and Ready on a node."""
        return {n: p for n, p in self.live().items() if is_running(p)}

    def describe(self) -> str:
        return ", ".join(
            f"{n}({p.status.phase if p.status else '?'} on {p.spec.nodeName if p.spec else '?'}"
            f"{' deleting' if p.metadata and p.metadata.deletionTimestamp else ''})"
            for n, p in sorted(self.pods.items())
        )


def node_of(pod: Pod) -> str | None:
    return pod.spec.nodeName if pod.spec else None


def is_running(pod: Pod) -> bool:
    if not (pod.status and pod.spec and pod.spec.nodeName and pod.status.phase == "Running"):
        return False
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def deployment(replicas: int) -> Deployment:
    labels = {"app": APP}
    return Deployment(
        metadata=ObjectMeta(name=APP, namespace=NS),
        spec=DeploymentSpec(
            replicas=replicas,
            selector=meta_v1.LabelSelector(matchLabels=labels),
            template=PodTemplateSpec(
                metadata=ObjectMeta(labels=labels),
                # kwok runs nothing: the image is never pulled.
                spec=PodSpec(containers=[Container(name="agent", image="example.invalid/agent:1")]),
            ),
        ),
    )


@contextlib.asynccontextmanager
async def client_for(kube: Cluster) -> AsyncIterator[AsyncClient]:
    client = AsyncClient(kube.config(), namespace=NS, field_manager="voicefleet-test")
    try:
        yield client
    finally:
        await client.close()


async def test_deployment_runs_replaces_and_scales_down_by_deletion_cost(kube: Cluster) -> None:
    async with client_for(kube) as client, PodWatch(client, {"app": APP}) as pods:
        fake_nodes = set()
        async for node in client.list(Node):
            assert node.metadata is not None and node.metadata.name is not None
            if (node.metadata.annotations or {}).get(KWOK_NODE) == "fake":
                fake_nodes.add(node.metadata.name)
        assert fake_nodes == set(kube.nodes)

        # RBAC is on: a user of the cluster's CA with no role binding may not read a Deployment.
        nobody = AsyncClient(KubeConfig.from_file(kube.kubeconfig_for("nobody")), namespace=NS)
        try:
            with pytest.raises(ApiError) as denied:
                await nobody.get(Deployment, APP)
            assert denied.value.status.code == 403
        finally:
            await nobody.close()

        # Two replicas: both pods scheduled onto kwok's nodes and Running there.
        await client.create(deployment(replicas=2))
        await pods.until("2 pods Running", lambda: len(pods.running()) == 2)
        first = pods.running()
        assert all(p.spec and p.spec.nodeName in fake_nodes for p in first.values())

        # One pod deleted: the ReplicaSet makes another, which runs too.
        gone = sorted(first)[0]
        await client.delete(Pod, gone, namespace=NS)
        await pods.until(
            f"{gone} replaced",
            lambda: gone in pods.deleted and len(pods.running()) == 2 and gone not in pods.pods,
        )
        replacement = set(pods.running()) - set(first)
        assert len(replacement) == 1, pods.describe()
        survivor = (set(first) - {gone}).pop()
        assert survivor in pods.running()

        # Three replicas on two nodes, each with a deletion cost. The cheapest goes to the pod
        # alone on its node, which a scale-down would otherwise keep: the ReplicaSet controller
        # removes a pod that shares its node with another first ("doubled up"), a rule that comes
        # right after the cost and before any timing or random one.
        await client.patch(Deployment, APP, {"spec": {"replicas": 3}}, namespace=NS)
        await pods.until("3 pods Running", lambda: len(pods.running()) == 3)
        on_node = Counter(node_of(p) for p in pods.running().values())
        three = sorted(
            pods.running(),
            key=lambda n: (on_node[node_of(pods.pods[n])] != 1, n != survivor),
        )
        victim = three[0]
        costs = dict(zip(three, ["-5", "100", "50"], strict=True))
        for name, cost in costs.items():
            patch = {"metadata": {"annotations": {DELETION_COST: cost}}}
            await client.patch(Pod, name, patch, namespace=NS)

        def annotated() -> bool:
            seen = {
                n: (p.metadata.annotations or {}).get(DELETION_COST) if p.metadata else None
                for n, p in pods.running().items()
            }
            return seen == costs

        await pods.until("costs seen", annotated)
        deleted_before = len(pods.deleted)

        await client.patch(Deployment, APP, {"spec": {"replicas": 2}}, namespace=NS)
        await pods.until(
            "one pod removed",
            lambda: len(pods.live()) == 2 and len(pods.deleted) > deleted_before,
        )
        assert pods.deleted[deleted_before:] == [victim], (on_node, costs, pods.describe())
        assert set(pods.running()) == set(costs) - {victim}
