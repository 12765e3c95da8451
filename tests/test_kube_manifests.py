"""deploy/kubernetes/ applied to a real API server (tests/kube.py; kwok's nodes).

Every object is created as written, with strict field validation (a misspelt field is an
error, not silently dropped); volumes are given PersistentVolumes to bind to (this cluster has
no provisioner); then the controllers and the scheduler must bring the server's Deployment
and PostgreSQL's StatefulSet to ready pods, which proves their selectors, labels, volumes,
Secrets and service account fit together. kwok runs no container: that the server image
starts and serves is not shown here (docs/kubernetes.md walks it on kind and k3s)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
import yaml

from tests.kube import Cluster, kube_cluster, require_binaries
from voicefleet.cli.main import app as cli
from voicefleet.runtime.kubernetes import PERMISSIONS

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "deploy" / "kubernetes"
NS = "voicefleet"
SERVER_ACCOUNT = f"system:serviceaccount:{NS}:voicefleet"


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_binaries()
    with kube_cluster(tmp_path_factory.mktemp("kube"), nodes=1) as cluster:
        yield cluster


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((MANIFESTS / name).read_text()) if d]


def collection(doc: dict[str, Any]) -> str:
    """The API path that creates `doc`."""
    version, kind = doc["apiVersion"], doc["kind"]
    prefix = "/api/v1" if version == "v1" else f"/apis/{version}"
    plural = kind.lower() + "s"
    namespace = doc["metadata"].get("namespace")
    return f"{prefix}/namespaces/{namespace}/{plural}" if namespace else f"{prefix}/{plural}"


def create(client: httpx.Client, doc: dict[str, Any]) -> None:
    r = client.post(collection(doc), params={"fieldValidation": "Strict"}, json=doc)
    assert r.status_code == 201, f"{doc['kind']} {doc['metadata']['name']}: {r.text}"


def until(check: Any, what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.2)


def allowed(client: httpx.Client, verb: str, resource: str, namespace: str) -> bool:
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": SERVER_ACCOUNT,
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{NS}"],
            "resourceAttributes": {"verb": verb, "resource": resource, "namespace": namespace},
        },
    }
    r = client.post("/apis/authorization.k8s.io/v1/subjectaccessreviews", json=review)
    r.raise_for_status()
    return bool(r.json()["status"].get("allowed"))


def test_the_manifests_install_a_server_and_postgres_that_come_up(kube: Cluster) -> None:
    kustomization = documents("kustomization.yaml")[0]
    files = kustomization["resources"]
    # Everything but the Secrets' template, which is applied once, by hand.
    assert sorted(files) == sorted(
        p.name
        for p in MANIFESTS.glob("*.yaml")
        if p.name not in ("kustomization.yaml", "secrets.example.yaml")
    )
    with kube.http() as client:
        for name in ["namespace.yaml", "secrets.example.yaml", *files[1:]]:
            for doc in documents(name):
                create(client, doc)
        for size in ("5Gi", "10Gi"):  # what a provisioner would make for the two claims
            volume = {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": f"pv-{size.lower()}"},
                "spec": {
                    "capacity": {"storage": size},
                    "accessModes": ["ReadWriteOnce"],
                    "hostPath": {"path": f"/tmp/pv-{size}"},
                },
            }
            create(client, volume)

        def ready(kind: str, name: str, field: str) -> bool:
            found = client.get(f"/apis/apps/v1/namespaces/{NS}/{kind}/{name}").json()
            return bool(found.get("status", {}).get(field) == 1)

        until(lambda: ready("deployments", "voicefleet", "availableReplicas"), "the server")
        until(lambda: ready("statefulsets", "postgres", "readyReplicas"), "postgres")
        pods = client.get(
            f"/api/v1/namespaces/{NS}/pods",
            params={"labelSelector": "app.kubernetes.io/name=voicefleet"},
        ).json()["items"]
        (server,) = pods
        assert server["spec"]["serviceAccountName"] == "voicefleet"

        # The server's account may do what the runtime does, in its namespace and nowhere else.
        for verb, resource in PERMISSIONS:
            assert allowed(client, verb, resource, NS), (verb, resource)
            assert not allowed(client, verb, resource, "default"), (verb, resource)
        assert not allowed(client, "get", "secrets", NS)  # it never reads one back


def test_the_server_settings_are_vf_server_options() -> None:
    """Each VF_ variable the ConfigMap sets is one `vf server` reads."""
    command = typer.main.get_command(cli).commands["server"]  # type: ignore[attr-defined]
    known = {p.envvar for p in command.params if isinstance(p.envvar, str)}
    (config,) = [d for d in documents("server.yaml") if d["kind"] == "ConfigMap"]
    settings = set(config["data"])
    assert settings <= known, settings - known
    (deployment,) = [d for d in documents("server.yaml") if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert {e["name"] for e in container["env"]} - {"POSTGRES_PASSWORD"} <= known
