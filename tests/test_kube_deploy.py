"""Deploys on the Kubernetes runtime, end to end, on a real control plane (tests/kube.py).

What is real: `vf server --runtime kubernetes` as a subprocess, with the Role of
deploy/kubernetes/rbac.yaml as its only permission; the `vf agent` CLI; buildah building the
uploaded folder (its own Dockerfile, on the local Debian base of scripts/base-image) and pushing
to Debian's docker-registry on 127.0.0.1, whose HTTP API the tests read; kube-apiserver, etcd,
the controller manager and the scheduler. What is not: kwok plays the nodes, so no container
runs and no image is pulled. tests/pods.py plays the rest of a kubelet's part: for each pod it
runs the agent's code as a local process with exactly the pod's environment (its Secret
resolved), so workers register with the credentials the pods carry and rollouts complete.

The tests share one server, one agent and one cluster and run in order (v1, v2 and a
rollback, a failed build, a prebuilt image, then every strategy with sessions in flight on
prebuilt images: a rolling deploy, a pod deleted by hand, scaling down and to zero and a cold
start, a server restart, a canary and a blue-green): each build costs seconds, the cluster more.
Skipped when buildah, docker-registry or the Kubernetes binaries are missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from lightkube.resources.core_v1 import Pod
from livekit import api
from typer.testing import CliRunner

from tests import images
from tests.kube import (
    Cluster,
    admin,
    free_ports,
    kube_cluster,
    make_namespace,
    require_binaries,
)
from tests.pods import PlayedPod, PodPlayer
from tests.support import (
    DEV_KEY,
    DEV_SECRET,
    MARKER_AGENT,
    NO_REASON,
    Server,
    admin_token,
    release,
    started,
    until,
)
from voicefleet.cli.main import app as cli

AGENT = "kd-bot"
REPOSITORY = f"vf/{AGENT}"  # the server's --registry prefix, then the agent's name
DOCKERFILE = """\
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
WORKDIR /app
COPY agent.py ./
USER 10001:10001
CMD ["python", "agent.py", "start"]
"""
PREBUILT = "registry.example.com/team/prebuilt-agent:2.0"  # kwok pulls nothing

pytestmark = pytest.mark.timeout(600)


@dataclass
class Setup:
    kube: Cluster
    namespace: str
    registry: str
    server: Server
    agent: Path
    markers: Path
    player: PodPlayer

    def vf(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "VF_URL": self.server.url,
            "VF_API_KEY": DEV_KEY,
            "VF_API_SECRET": DEV_SECRET,
        }
        done = subprocess.run(
            [sys.executable, "-m", "voicefleet", "agent", *args],
            cwd=self.agent, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if ok:
            assert done.returncode == 0, f"vf agent {' '.join(args)}:\n{done.stdout}{done.stderr}"
        return done

    def get(self, path: str) -> Any:
        r = httpx.get(
            f"{self.server.url}/api/v1{path}",
            headers={"Authorization": f"Bearer {admin_token()}"},
            timeout=30,
        )
        r.raise_for_status()
        return r.json()

    def versions(self) -> dict[str, dict[str, Any]]:
        return {v["version"]: v for v in self.get(f"/agents/{AGENT}/versions")}

    def serving(self) -> str:
        status = self.get(f"/agents/{AGENT}")
        (dep,) = [d for d in status["deployments"] if d["name"] == "production"]
        return str(dep["version"])

    def pods(self) -> list[Pod]:
        """The namespace's pods now, from the API server (not deleting)."""

        async def listed() -> list[Pod]:
            async with admin(self.kube, self.namespace) as client:
                return [
                    p
                    async for p in client.list(Pod)
                    if p.metadata is not None and p.metadata.deletionTimestamp is None
                ]

        return asyncio.run(listed())

    def session(self, room: str) -> dict[str, Any]:
        """One session dispatched to the agent, run to its end: its job."""

        async def dispatched() -> str:
            async with api.LiveKitAPI(self.server.url, DEV_KEY, DEV_SECRET) as lk:
                d = await lk.agent_dispatch.create_dispatch(
                    api.CreateAgentDispatchRequest(agent_name=AGENT, room=room, metadata="{}")
                )
                return str(d.state.jobs[0].id)

        job_id = asyncio.run(dispatched())

        def ended() -> dict[str, Any] | None:
            if not (self.markers / f"{job_id}.done").exists():
                return None
            r = httpx.get(
                f"{self.server.url}/api/v1/jobs/{job_id}",
                headers={"Authorization": f"Bearer {admin_token()}"},
                timeout=30,
            )
            job: dict[str, Any] = r.json() if r.status_code == 200 else {}
            return job if job.get("version") else None

        return until(ended, f"session {job_id} to run on a pod's worker")


@contextlib.contextmanager
def playing(player: PodPlayer) -> Iterator[PodPlayer]:
    """The pod player on an event loop of its own, in a thread, for the whole module."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(player.__aenter__())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="pod-player", daemon=True)
    thread.start()
    ready.wait(30)
    try:
        yield player
    finally:
        asyncio.run_coroutine_threadsafe(player.__aexit__(None, None, None), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    images.require("buildah", "debootstrap", "docker-registry")
    require_binaries()
    base = images.base_image()
    root = tmp_path_factory.mktemp("kube-deploy")
    agent = root / "agent"
    agent.mkdir()
    shutil.copy(MARKER_AGENT, agent / "agent.py")
    (agent / "Dockerfile").write_text(DOCKERFILE)
    markers = root / "markers"
    markers.mkdir()
    with (
        kube_cluster(root / "kube", nodes=2) as kube,
        images.registry(root / "registry") as registry,
    ):
        user = "voicefleet-server"
        namespace = asyncio.run(make_namespace(kube, user))
        server = Server(
            root / "server",
            "--runtime", "kubernetes", f"--kubeconfig={kube.kubeconfig_for(user)}",
            f"--kube-namespace={namespace}", f"--registry={registry}/vf", "--registry-insecure",
            f"--image-base={base}",
            # A rollback starts new pods (none kept warm), so that they show which image runs.
            "--keep-warm=0",
        )  # fmt: skip
        server.start()
        player = PodPlayer(kube, namespace, agent, root / "pod-logs")
        try:
            with playing(player):
                yield Setup(kube, namespace, registry, server, agent, markers, player)
        finally:
            server.stop()
            print(f"vf server log: {server.log_path}")
            remove_local_images(f"localhost/{AGENT}")


def remove_local_images(repository: str) -> None:
    """The images the servers built here, from buildah's storage (their layers stay cached
    until pruned): tagged `repository:<source digest>`."""
    listed = subprocess.run(
        ["buildah", "images", "--format", "{{.Name}}:{{.Tag}}"],
        capture_output=True, text=True,
    )  # fmt: skip
    mine = [ref for ref in listed.stdout.split() if ref.startswith(f"{repository}:")]
    if mine:
        subprocess.run(["buildah", "rmi", *mine], capture_output=True)


def test_a_deploy_builds_the_image_pushes_it_by_digest_and_runs_its_pods(setup: Setup) -> None:
    """Proves: the upload is built with buildah and pushed to the server's registry, tagged by
    the version's source digest; the version records the reference by digest; the pods run that
    exact reference, labelled; their workers (with the pods' env) register and serve."""
    setup.vf("create", "--name", AGENT)
    setup.vf("secrets", "set", f"MARKER_DIR={setup.markers}")
    setup.vf("scale", "2")
    deployed = setup.vf("deploy")
    assert "building image" in deployed.stdout and "STEP" in deployed.stdout  # buildah's log
    assert "pushed" in deployed.stdout, deployed.stdout
    v1 = setup.versions()["v1"]
    assert v1["status"] == "ready"
    assert v1["image"] == f"{setup.registry}/{REPOSITORY}@{v1['image_digest']}"
    assert v1["image_digest"].startswith("sha256:")
    # In the registry, by the source digest, serving the very manifest the version records.
    assert images.tags(setup.registry, REPOSITORY) == [v1["source_digest"]]
    served = images.manifest_digest(setup.registry, REPOSITORY, v1["source_digest"])
    assert served == v1["image_digest"]

    agent_id = setup.get(f"/agents/{AGENT}")["agent"]["id"]
    pods = setup.pods()
    assert len(pods) == 2
    for pod in pods:
        assert pod.metadata and pod.spec
        labels = pod.metadata.labels or {}
        assert labels["voicefleet.io/agent"] == agent_id
        assert labels["voicefleet.io/deployment"] == "production"
        assert labels["voicefleet.io/version"] == "v1"
        (container,) = pod.spec.containers
        assert container.image == v1["image"]
        assert container.command is None  # the image's own CMD
    assert setup.serving() == "v1"
    job = setup.session("kd-room-1")
    assert job["version"] == "v1"


def test_a_rollback_runs_the_kept_image_again_without_a_build(setup: Setup) -> None:
    """Proves: v2 (a source change) is a new image, a new tag; a rollback to v1 starts new pods
    with v1's recorded reference, and builds and pushes nothing."""
    with open(setup.agent / "agent.py", "a") as f:
        f.write("\n# v2\n")
    setup.vf("deploy")
    versions = setup.versions()
    v1, v2 = versions["v1"], versions["v2"]
    assert v2["image"] != v1["image"] and v2["image_digest"] != v1["image_digest"]
    assert setup.serving() == "v2"
    assert {p.image for p in setup.player.seen(version="v2")} == {v2["image"]}

    def v1_drained() -> bool:  # retired (none kept warm), then deleted by the reaper
        return {p.spec.containers[0].image for p in setup.pods() if p.spec} == {v2["image"]}

    until(v1_drained, "v1's pods to be drained")
    tags_before = images.tags(setup.registry, REPOSITORY)
    assert tags_before == sorted([v1["source_digest"], v2["source_digest"]])
    v1_pods_before = {p.uid for p in setup.player.seen(version="v1")}
    log_before = setup.server.log().count("building image")

    rolled = setup.vf("rollback")
    assert "rollback to v1: complete" in rolled.stdout, rolled.stdout
    assert setup.serving() == "v1"
    again = [p for p in setup.player.seen(version="v1") if p.uid not in v1_pods_before]
    assert len(again) == 2  # new pods (nothing kept warm) ...
    assert {p.image for p in again} == {v1["image"]}  # ... of v1's image, by its digest
    assert set(setup.versions()) == {"v1", "v2"}  # no new version
    assert images.tags(setup.registry, REPOSITORY) == tags_before  # nothing pushed
    assert setup.server.log().count("building image") == log_before  # nothing built
    assert setup.session("kd-room-2")["version"] == "v1"


def v1_pods(setup: Setup) -> set[str]:
    """The uids of v1's pods, as the API server has them now."""
    return {
        p.metadata.uid or ""
        for p in setup.pods()
        if p.metadata and (p.metadata.labels or {}).get("voicefleet.io/version") == "v1"
    }


def test_a_failed_build_fails_the_version_starts_no_pod_and_v1_keeps_serving(
    setup: Setup,
) -> None:
    """Proves: a Dockerfile step that fails fails the version with buildah's reason; no pod is
    ever created for it; the serving version's pods are untouched and keep serving."""
    good = (setup.agent / "Dockerfile").read_text()
    (setup.agent / "Dockerfile").write_text(good + "RUN echo no-such-step && exit 3\n")
    pods_before = v1_pods(setup)
    try:
        failed = setup.vf("deploy", ok=False)
    finally:
        (setup.agent / "Dockerfile").write_text(good)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "build of v3 failed; production keeps its current version" in failed.stderr
    assert "no-such-step" in failed.stdout  # the build log, streamed
    v3 = setup.versions()["v3"]
    assert v3["status"] == "failed" and v3["image"] == ""
    assert "the image build failed" in v3["error"]
    assert setup.player.seen(version="v3") == []
    assert setup.serving() == "v1"
    assert v1_pods(setup) == pods_before
    assert setup.session("kd-room-3")["version"] == "v1"


def test_deploy_image_runs_the_given_reference_with_no_build(setup: Setup) -> None:
    """Proves: --image makes a version of a prebuilt image, ready at once, whose pods run the
    reference as given; nothing is built or pushed."""
    tags_before = images.tags(setup.registry, REPOSITORY)
    done = setup.vf("deploy", "--image", PREBUILT)
    assert f"runs the prebuilt image {PREBUILT}" in done.stdout
    v4 = setup.versions()["v4"]
    assert (v4["status"], v4["image"], v4["image_digest"]) == ("ready", PREBUILT, "")
    assert v4["source_digest"] == hashlib.sha256(PREBUILT.encode()).hexdigest()
    assert setup.serving() == "v4"
    assert {p.image for p in setup.player.seen(version="v4")} == {PREBUILT}
    assert images.tags(setup.registry, REPOSITORY) == tags_before
    log = httpx.get(
        f"{setup.server.url}/api/v1/agents/{AGENT}/versions/v4/log",
        headers={"Authorization": f"Bearer {admin_token()}"},
    ).text
    assert f"prebuilt image {PREBUILT}: nothing to build" in log
    bad = setup.vf("deploy", "--image", "Not A Reference", ok=False)
    assert bad.returncode == 1 and "is not an image reference" in bad.stderr
    assert setup.serving() == "v4"


NEXT = "registry.example.com/team/prebuilt-agent:2.1"


def dispatch(setup: Setup, room: str, **metadata: object) -> str:
    """A session dispatched to the agent, not waited for: its job id."""

    async def dispatched() -> str:
        async with api.LiveKitAPI(setup.server.url, DEV_KEY, DEV_SECRET) as lk:
            d = await lk.agent_dispatch.create_dispatch(
                api.CreateAgentDispatchRequest(
                    agent_name=AGENT, room=room, metadata=json.dumps(metadata)
                )
            )
            return str(d.state.jobs[0].id)

    return asyncio.run(dispatched())


def running_on(setup: Setup, job_id: str, but: int = 0) -> PlayedPod:
    """The pod whose process runs job `job_id` (its worker's process group), once it started
    there (on a process group other than `but`)."""

    def found() -> PlayedPod | None:
        info = started(setup.markers, job_id)
        if info is None or info["worker_pgid"] == but:
            return None
        for pod in setup.player.pods.values():
            if pod.proc is not None and pod.proc.pid == info["worker_pgid"]:
                return pod
        return None

    return until(found, f"session {job_id} to start on a pod")


def job(setup: Setup, job_id: str) -> dict[str, Any]:
    found: dict[str, Any] = setup.get(f"/jobs/{job_id}")
    return found


def uids(setup: Setup, **labels: str) -> set[str]:
    return {
        p.metadata.uid or ""
        for p in setup.pods()
        if p.metadata
        and all((p.metadata.labels or {}).get(f"voicefleet.io/{k}") == v for k, v in labels.items())
    }


def ended(setup: Setup, job_id: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        found = job(setup, job_id)
        return found if found["state"] in ("succeeded", "failed") else None

    done = until(check, f"session {job_id} to end")
    assert (setup.markers / f"{job_id}.done").exists(), f"{job_id} was cut: {done}"
    assert done["state"] == "succeeded" or done["error"] == NO_REASON, done
    return done


def test_a_deploy_during_a_live_session_cuts_nothing_and_deletes_its_pod_only_once_idle(
    setup: Setup,
) -> None:
    """Proves: v5 deployed while a session runs on a v4 pod serves every new session; the idle
    v4 pod goes; the busy one stays (not even terminating) until its session ended, whole, and
    then is deleted."""
    live = dispatch(setup, "kd-live", until_released=True)
    busy = running_on(setup, live)
    assert busy.labels["voicefleet.io/version"] == "v4"
    began = time.monotonic()
    setup.vf("deploy", "--image", NEXT)
    assert setup.serving() == "v5"
    assert setup.session("kd-after-deploy")["version"] == "v5"
    print(f"deploy -> new sessions on v5: {time.monotonic() - began:.1f}s")
    until(lambda: uids(setup, version="v4") == {busy.uid}, "the idle v4 pod to be deleted")
    time.sleep(3)  # a reaper that took busy pods too would have had its turn
    assert uids(setup, version="v4") == {busy.uid}
    assert job(setup, live)["state"] == "running"
    release(setup.markers, live)
    done = ended(setup, live)
    assert done["version"] == "v4"
    until(lambda: not uids(setup, version="v4"), "the v4 pod to be deleted once idle")


def test_a_pod_deleted_by_hand_mid_session_is_replaced_and_its_session_runs_elsewhere(
    setup: Setup,
) -> None:
    """Proves: a pod deleted at once (grace 0: the kubelet kills its process) while it runs a
    session: the server dispatches the session again to the other pod, where it runs to its
    end, and a new pod restores the count."""
    until(lambda: len(uids(setup, version="v5")) == 2, "v5's two pods")
    before = uids(setup, version="v5")
    live = dispatch(setup, "kd-lost", until_released=True)
    lost = running_on(setup, live)
    assert lost.proc is not None
    pgid = lost.proc.pid

    async def delete() -> None:
        async with admin(setup.kube, setup.namespace) as client:
            await client.delete(Pod, lost.name, namespace=setup.namespace, grace_period=0)

    asyncio.run(delete())
    os.killpg(pgid, signal.SIGKILL)  # the kubelet's part at grace 0 (the player sends SIGTERM)
    again = running_on(setup, live, but=pgid)
    assert again.uid in before and again.uid != lost.uid
    release(setup.markers, live)
    done = ended(setup, live)
    assert done["redispatches"] >= 1, done

    def restored() -> set[str] | None:
        now = uids(setup, version="v5")
        return now if len(now) == 2 and lost.uid not in now else None

    assert len(until(restored, "a new pod in the deleted one's place") - before) == 1


def test_scale_down_deletes_the_idle_pod_then_to_zero_and_a_cold_start_runs_the_session(
    setup: Setup,
) -> None:
    """Proves: scaling 2 -> 1 with a session on one pod deletes the idle pod, and the session
    runs to its end; autoscaled with min 0, the pods go once idle; a session dispatched to zero
    pods waits (not refused), a pod starts, and the session runs there."""
    live = dispatch(setup, "kd-scale-down", until_released=True)
    busy = running_on(setup, live)
    setup.vf("scale", "1")
    until(lambda: uids(setup, version="v5") == {busy.uid}, "the idle pod to be deleted")
    assert job(setup, live)["state"] == "running"
    release(setup.markers, live)
    ended(setup, live)

    setup.vf(
        "scale", "--min", "0", "--max", "2", "--idle-to-zero", "2s", "--up-window", "1s",
        "--down-window", "30s",
    )  # fmt: skip
    until(lambda: not uids(setup, agent=busy.labels["voicefleet.io/agent"]), "zero pods")
    before = set(setup.player.pods)
    began = time.monotonic()
    cold = dispatch(setup, "kd-cold")
    pod = running_on(setup, cold)
    print(f"cold start from zero pods, dispatch -> running: {time.monotonic() - began:.1f}s")
    assert pod.uid not in before and pod.labels["voicefleet.io/version"] == "v5"
    assert ended(setup, cold)["version"] == "v5"


def test_a_restarted_server_adopts_the_pods_and_their_sessions_run_on(setup: Setup) -> None:
    """Proves: the server stopped and started again (same address, same store) keeps the pods
    it finds: no pod is created or deleted, the session in flight runs to its end, and new
    sessions run on the same pods."""
    setup.vf("scale", "2")
    until(lambda: len(uids(setup, version="v5")) == 2, "two v5 pods")
    pods = uids(setup, version="v5")
    seen = set(setup.player.pods)
    live = dispatch(setup, "kd-restart", until_released=True)
    busy = running_on(setup, live)
    setup.server.port = int(setup.server.url.rsplit(":", 1)[1])  # the address the pods know
    setup.server.stop(leave_instances=True)
    setup.server.start()
    assert setup.serving() == "v5"
    until(lambda: job(setup, live)["state"] == "running", "the live session, reported again")
    release(setup.markers, live)
    assert ended(setup, live)["instance"] == job(setup, live)["instance"]
    again = setup.session("kd-after-restart")
    assert again["version"] == "v5"
    assert uids(setup, version="v5") == pods and busy.uid in pods
    assert set(setup.player.pods) == seen  # no pod made, none replaced


def test_a_canary_aborted_and_a_blue_green_with_smoke_sessions_cut_no_session(
    setup: Setup,
) -> None:
    """Proves, on pods: a 50 % canary takes new sessions beside stable; aborted, stable takes
    them all again and the canary's pods go; a blue-green smoke-tests green on its own pods,
    then switches, and blue's busy pod, terminating, runs its session to its end there."""
    live = dispatch(setup, "kd-canary-live", until_released=True)
    running_on(setup, live)
    out = setup.vf("deploy", "--image", f"{PREBUILT[:-4]}:2.2", "--canary", "50")
    assert "canary v6 takes 50% of new sessions" in out.stdout, out.stdout
    # Sessions one after another until both sides served one (at 50 %, a few; a new worker
    # warming up on a loaded machine refuses some, which then go to stable).
    served: set[str] = set()
    for i in range(40):
        served.add(ended(setup, dispatch(setup, f"kd-canary-{i}"))["version"])
        if served == {"v5", "v6"}:
            break
    assert served == {"v5", "v6"}
    assert "aborted by request" in setup.vf("canary", "abort").stdout
    (dep,) = setup.get(f"/agents/{AGENT}")["deployments"]
    assert (dep["version"], dep["routing"]) == ("v5", {"v5": 100})
    until(lambda: not uids(setup, version="v6"), "the canary's pods to go")
    assert setup.session("kd-after-abort")["version"] == "v5"
    assert job(setup, live)["state"] == "running"

    out = setup.vf("deploy", "--image", f"{PREBUILT[:-4]}:2.3", "--strategy", "bluegreen")
    assert "serves v7" in out.stdout, out.stdout
    smoke = [j for j in setup.get("/jobs?limit=100") if j["room"].startswith("vf-smoke-v7-")]
    assert smoke and {(j["version"], j["state"]) for j in smoke} == {("v7", "succeeded")}
    assert setup.session("kd-green")["version"] == "v7"
    # Blue's pods are deleted with the agent's grace: terminating, the busy one finishes.
    until(lambda: not uids(setup, version="v5"), "blue's pods to be terminating")
    time.sleep(3)  # a session cut or dispatched again would show by now
    assert (job(setup, live)["state"], job(setup, live)["redispatches"]) == ("running", 0)
    release(setup.markers, live)
    done = ended(setup, live)
    assert (done["version"], done["redispatches"]) == ("v5", 0), done


def test_a_registry_that_refuses_the_push_fails_the_version(setup: Setup, tmp_path: Path) -> None:
    """Proves: a push that fails (nothing listens at the registry's address) fails the
    version with the push's reason, after a build that succeeded; no pod is created."""
    user = "voicefleet-no-registry"
    namespace = asyncio.run(make_namespace(setup.kube, user))
    (closed,) = free_ports(1)
    server = Server(
        tmp_path / "server",
        "--runtime", "kubernetes", f"--kubeconfig={setup.kube.kubeconfig_for(user)}",
        f"--kube-namespace={namespace}", f"--registry=127.0.0.1:{closed}/vf",
        "--registry-insecure", f"--image-base={images.base_image()}",
    )  # fmt: skip
    server.start()
    agent = tmp_path / "agent"  # the same files (built from cache), not yet an agent
    shutil.copytree(setup.agent, agent, ignore=shutil.ignore_patterns("livekit.toml"))
    try:
        other = Setup(setup.kube, namespace, "", server, agent, setup.markers, setup.player)
        other.vf("create", "--name", AGENT)
        failed = other.vf("deploy", ok=False)
        assert failed.returncode == 1, failed.stdout + failed.stderr
        v1 = other.versions()["v1"]
        assert v1["status"] == "failed" and v1["image"] == ""
        reason = v1["error"].splitlines()[0]  # buildah's own reason, then its log's tail
        assert reason.startswith("the push failed: pushing image"), v1["error"]
        assert f"127.0.0.1:{closed}" in reason and "connection refused" in reason
        assert other.pods() == []
    finally:
        server.stop()


def test_without_a_registry_an_upload_is_refused_and_images_still_deploy(
    setup: Setup, tmp_path: Path
) -> None:
    """Proves: a Kubernetes server with no --registry refuses an upload at once, saying what to
    do, and keeps nothing of it; a prebuilt image deploys there."""
    user = "voicefleet-images-only"
    namespace = asyncio.run(make_namespace(setup.kube, user))
    server = Server(
        tmp_path / "server",
        "--runtime", "kubernetes", f"--kubeconfig={setup.kube.kubeconfig_for(user)}",
        f"--kube-namespace={namespace}",
    )  # fmt: skip
    server.start()
    agent = tmp_path / "agent"
    shutil.copytree(setup.agent, agent, ignore=shutil.ignore_patterns("livekit.toml"))
    player = PodPlayer(setup.kube, namespace, agent, tmp_path / "pod-logs")
    try:
        with playing(player):
            other = Setup(setup.kube, namespace, "", server, agent, setup.markers, player)
            other.vf("create", "--name", AGENT)
            refused = other.vf("deploy", ok=False)
            assert refused.returncode == 1
            assert "has no registry to push builds to" in refused.stderr
            assert "--registry" in refused.stderr and "--image" in refused.stderr
            assert other.versions() == {}
            other.vf("secrets", "set", f"MARKER_DIR={setup.markers}")
            other.vf("deploy", "--image", PREBUILT)
            assert other.versions()["v1"]["image"] == PREBUILT
            assert {p.image for p in player.seen(version="v1")} == {PREBUILT}
    finally:
        server.stop()


# -- bad settings, refused before anything runs ------------------------------------------------


def test_deploy_image_on_the_local_runtime_is_refused_clearly(
    tmp_path: Path, server: Server
) -> None:
    env = {**os.environ, "VF_URL": server.url, "VF_API_KEY": DEV_KEY, "VF_API_SECRET": DEV_SECRET}
    agent_id = httpx.post(
        f"{server.url}/api/v1/agents",
        json={"name": "kd-local-image"},
        headers={"Authorization": f"Bearer {admin_token()}"},
    ).json()["id"]
    done = subprocess.run(
        [sys.executable, "-m", "voicefleet", "agent", "deploy", "--id", agent_id,
         "--image", PREBUILT],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert "--image needs the Kubernetes runtime" in done.stderr
    versions = httpx.get(
        f"{server.url}/api/v1/agents/{agent_id}/versions",
        headers={"Authorization": f"Bearer {admin_token()}"},
    ).json()
    assert versions == []


def test_vf_server_help_lists_the_image_options() -> None:
    out = CliRunner().invoke(cli, ["server", "--help"], env={"COLUMNS": "250"})
    assert out.exit_code == 0, out.output
    for option in ("--registry", "--registry-insecure", "--registry-authfile", "--image-base",
                   "--image-build-ca", "--instance-url"):  # fmt: skip
        assert option in out.output


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--registry", "127.0.0.1:5000/vf"], "--registry is for images"),
        (["--runtime", "kubernetes", "--registry", "vf"], "does not start with a registry's host"),
        (
            ["--runtime", "kubernetes", "--registry", "localhost:5000", "--registry-authfile=/no"],
            "--registry-authfile /no is not a file",
        ),
        (["--runtime", "kubernetes", "--instance-url", "http://x:1"], "not a ws:// or wss://"),
    ],
)
def test_vf_server_refuses_bad_image_settings_in_one_line(
    tmp_path: Path, args: list[str], says: str
) -> None:
    out = CliRunner().invoke(cli, ["server", f"--data-dir={tmp_path}", *args])
    assert out.exit_code == 2, out.output
    assert says in out.output and out.output.startswith("error:")
