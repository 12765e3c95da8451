"""An agent on a real node: `vf server --runtime kubernetes` deploys, a real kubelet runs the pod.

What is real: the control plane of tests/kube.py, with one node that is no kwok's but a kubelet
(built from the Kubernetes sources) with Debian's containerd, runc and CNI plugins
(tests/kubelet.py); buildah building the agent with voicefleet's own recipe (the folder has no
Dockerfile: `vf agent dockerfile`'s multi-stage uv build, on the local Debian base) and pushing
it to Debian's docker-registry, from which containerd pulls it. The worker in the container
registers with the server over the pod network (the server listens on the node bridge's host
address) and runs a session there: the session's marker file is found inside the container's
own filesystem, and nowhere on the host. Then, on that node: a pod deleted by hand drains and
is replaced; a rolling deploy with a session in flight, a rollback with no build, and a cold
start from zero pods.

Skipped, saying why, when the machine lacks any of it (root, buildah, docker-registry,
containerd, runc, containernetworking-plugins, the Kubernetes binaries and the kubelet).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import pytest
from livekit import api

from tests import images, kubelet, support
from tests.kube import Cluster, kube_cluster, make_namespace, require_binaries
from tests.support import DEV_KEY, DEV_SECRET, Server, admin_token, release
from voicefleet.build.image import host_ca_bundle

AGENT = "node-bot"
MARKERS = "/tmp/markers"  # inside the container
# The agent: livekit-agents only, marker files per session (in the container's /tmp). A job
# whose metadata is "hold" runs until `<job id>.release` appears there (the test writes it).
AGENT_SOURCE = f'''\
import asyncio
import json
import os
import socket
from pathlib import Path

from livekit.agents import JobContext, WorkerOptions, cli

MARKERS = Path("{MARKERS}")


async def entrypoint(ctx: JobContext) -> None:
    MARKERS.mkdir(parents=True, exist_ok=True)
    facts = {{"job_id": ctx.job.id, "hostname": socket.gethostname(), "uid": os.getuid()}}
    (MARKERS / f"{{ctx.job.id}}.started").write_text(json.dumps(facts))
    if ctx.job.metadata == "hold":
        while not (MARKERS / f"{{ctx.job.id}}.release").exists():
            await asyncio.sleep(0.1)
    (MARKERS / f"{{ctx.job.id}}.done").write_text(json.dumps(facts))
    ctx.shutdown("done")


if __name__ == "__main__":
    cli.run_app(WorkerOptions(entrypoint_fnc=entrypoint, num_idle_processes=1))
'''

pytestmark = pytest.mark.timeout(600)


# A real node takes longer than kwok's: pulls, container starts.
until = functools.partial(support.until, timeout=120.0, interval=0.5)


@dataclass
class Setup:
    kube: Cluster
    node: kubelet.Node
    namespace: str
    registry: str
    server: Server
    agent: Path

    def vf(self, *args: str) -> str:
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
        assert done.returncode == 0, f"vf agent {' '.join(args)}:\n{done.stdout}{done.stderr}"
        return done.stdout

    def get(self, path: str) -> Any:
        r = httpx.get(
            f"{self.server.url}/api/v1{path}",
            headers={"Authorization": f"Bearer {admin_token()}"},
            timeout=30,
        )
        r.raise_for_status()
        return r.json()

    def pods(self) -> list[dict[str, Any]]:
        with self.kube.http() as client:
            r = client.get(f"/api/v1/namespaces/{self.namespace}/pods")
            r.raise_for_status()
            items: list[dict[str, Any]] = r.json()["items"]
            return items


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    images.require("buildah", "debootstrap", "docker-registry")
    require_binaries()
    kubelet.require()
    base = images.base_image()
    root = tmp_path_factory.mktemp("kubelet")
    agent = root / "agent"
    agent.mkdir()
    (agent / "agent.py").write_text(AGENT_SOURCE)
    (agent / "requirements.txt").write_text(f"livekit-agents=={version('livekit-agents')}\n")
    with (
        kube_cluster(root / "kube", nodes=0) as kube,
        images.registry(root / "registry") as registry,
        kubelet.real_node(kube, root / "node", registry) as node,
    ):
        user = "voicefleet-server"
        namespace = asyncio.run(make_namespace(kube, user))
        server = Server(
            root / "server",
            # Where the pods reach it: the host's side of the node's bridge (a later --host
            # wins over Server's own 127.0.0.1); instances get ws://<that>:<port>.
            "--host", node.host_ip,
            "--runtime", "kubernetes", f"--kubeconfig={kube.kubeconfig_for(user)}",
            f"--kube-namespace={namespace}", f"--registry={registry}/vf", "--registry-insecure",
            f"--image-base={base}", "--keep-warm=0",
            # This machine's bundle, for the builds' RUN steps (PyPI may be behind a proxy).
            *(["--image-build-ca", str(ca)] if (ca := host_ca_bundle()) else []),
        )  # fmt: skip
        server.start()
        try:
            yield Setup(kube, node, namespace, registry, server, agent)
        finally:
            server.stop()
            print(f"vf server log: {server.log_path}\nnode: {node.dir}")
            listed = subprocess.run(
                ["buildah", "images", "--format", "{{.Name}}:{{.Tag}}"],
                capture_output=True, text=True,
            )  # fmt: skip
            mine = [r for r in listed.stdout.split() if r.startswith(f"localhost/{AGENT}:")]
            if mine:
                subprocess.run(["buildah", "rmi", *mine], capture_output=True)


def dispatch(setup: Setup, room: str, metadata: str = "") -> str:
    """A session for the agent; its job's id."""

    async def dispatched() -> str:
        async with api.LiveKitAPI(setup.server.url, DEV_KEY, DEV_SECRET) as lk:
            d = await lk.agent_dispatch.create_dispatch(
                api.CreateAgentDispatchRequest(agent_name=AGENT, room=room, metadata=metadata)
            )
            return str(d.state.jobs[0].id)

    return asyncio.run(dispatched())


def succeeded(setup: Setup, job_id: str) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        job: dict[str, Any] = setup.get(f"/jobs/{job_id}")
        assert job["state"] not in ("failed", "terminated"), job
        return job if job["state"] == "succeeded" else None

    return until(ended, f"job {job_id} recorded as succeeded")


def container_pid(node: kubelet.Node, container_id: str) -> int:
    """The host pid of a container's first process, from containerd."""
    cid = container_id.removeprefix("containerd://")
    for line in node.ctr("tasks", "ls").splitlines()[1:]:
        task, pid, *_ = line.split()
        if task == cid:
            return int(pid)
    raise AssertionError(f"containerd has no task {cid}")


def test_an_agent_runs_in_a_real_container_registers_and_serves_a_session(setup: Setup) -> None:
    """Proves: the image voicefleet builds runs under a real kubelet (pulled by containerd from
    the registry, by the digest the version records); the pod becomes Running and Ready (the
    worker's health endpoint, probed by the kubelet); its worker registers from inside the
    container over the pod network, and a session dispatched to the agent runs there."""
    setup.vf("create", "--name", AGENT)
    setup.vf("scale", "1")
    deployed = setup.vf("deploy")
    assert "pushed" in deployed, deployed
    v1 = {v["version"]: v for v in setup.get(f"/agents/{AGENT}/versions")}["v1"]
    assert v1["status"] == "ready", v1

    (pod,) = setup.pods()
    assert pod["spec"]["nodeName"] == setup.node.name
    assert pod["spec"]["containers"][0]["image"] == v1["image"]
    status = pod["status"]
    assert status["phase"] == "Running"
    (container,) = status["containerStatuses"]
    assert container["ready"] is True and "running" in container["state"]
    assert container["imageID"].endswith(v1["image_digest"])  # what containerd pulled
    assert status["podIP"].startswith(setup.node.subnet.rsplit(".", 1)[0] + ".")

    # The container's first process: the image's CMD, in the node's cgroups, as the image's
    # non-root user, with the pod's own network (not the host's).
    pid = container_pid(setup.node, container["containerID"])
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert [c.decode() for c in cmdline if c] == ["python", "agent.py", "start"]
    assert f"{setup.node.cgroup}/kubepods/" in Path(f"/proc/{pid}/cgroup").read_text()
    assert os.stat(f"/proc/{pid}").st_uid == 10001
    assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")

    workers = until(lambda: setup.server.workers(), "the pod's worker to register")
    assert len(workers) == 1

    job_id = dispatch(setup, "node-room-1")
    marker = Path(f"/proc/{pid}/root{MARKERS}/{job_id}.done")  # the container's filesystem
    until(marker.exists, f"session {job_id} to run in the container")
    facts = json.loads(marker.read_text())
    assert facts["hostname"] == pod["metadata"]["name"]  # the pod's own UTS namespace
    assert facts["uid"] == 10001
    assert not Path(f"{MARKERS}/{job_id}.done").exists()  # not on the host

    assert succeeded(setup, job_id)["version"] == "v1"


def live_pods(setup: Setup, version: str | None = None) -> list[dict[str, Any]]:
    """The pods not being deleted (of `version` only, if given)."""
    return [
        p
        for p in setup.pods()
        if not p["metadata"].get("deletionTimestamp")
        and version in (None, p["metadata"]["labels"].get("voicefleet.io/version"))
    ]


def running_pod(setup: Setup, version: str | None = None) -> tuple[dict[str, Any], int]:
    """The one pod not being deleted (of `version`, if given), once its container runs; and its
    first process's pid."""

    def found() -> tuple[dict[str, Any], int] | None:
        live = live_pods(setup, version)
        if len(live) != 1:
            return None
        statuses = live[0]["status"].get("containerStatuses") or []
        if not statuses or not statuses[0].get("ready"):
            return None
        return live[0], container_pid(setup.node, statuses[0]["containerID"])

    return until(found, "one running, ready pod")


def test_a_pod_deleted_by_hand_gets_sigterm_finishes_its_session_and_is_replaced(
    setup: Setup,
) -> None:
    """Proves: the kubelet's SIGTERM (a pod deleted by hand, with the pod's grace) drains the
    worker in the container: the session in flight is not cut, it ends when released, then
    the container exits and the pod goes; voicefleet creates a pod again (the count is kept),
    whose worker registers and serves the next session."""
    pod, pid = running_pod(setup)
    name = pod["metadata"]["name"]
    job_id = dispatch(setup, "node-room-hold", metadata="hold")
    root = Path(f"/proc/{pid}/root{MARKERS}")
    until((root / f"{job_id}.started").exists, f"session {job_id} to start in the container")

    with setup.kube.http() as client:
        client.delete(f"/api/v1/namespaces/{setup.namespace}/pods/{name}").raise_for_status()

    def draining() -> bool:
        # SIGTERM made livekit-agents drain: it reports itself full (no new sessions) and
        # keeps its own; voicefleet may also mark it draining, seeing the pod go.
        return [w["status"] for w in setup.server.workers()] in (["full"], ["draining"])

    until(draining, "the pod's worker to drain")
    assert Path(f"/proc/{pid}").exists()  # the container still runs: its session holds it
    assert setup.get(f"/jobs/{job_id}")["state"] == "running"

    (root / f"{job_id}.release").write_text("")
    assert succeeded(setup, job_id)["version"] == "v1"  # not cut
    until(lambda: not Path(f"/proc/{pid}").exists(), "the container to exit")
    until(
        lambda: all(
            p["metadata"]["name"] != name or p["metadata"]["uid"] != pod["metadata"]["uid"]
            for p in setup.pods()
        ),
        "the old pod to go",
    )

    _, new_pid = running_pod(setup)
    assert new_pid != pid
    until(
        lambda: [w["status"] for w in setup.server.workers()] == ["available"],
        "the new pod's worker to register (and the old one to be gone)",
    )
    job_id = dispatch(setup, "node-room-after")
    until(Path(f"/proc/{new_pid}/root{MARKERS}/{job_id}.done").exists, "a session on the new pod")
    assert succeeded(setup, job_id)["version"] == "v1"


def test_rolling_deploy_rollback_and_a_cold_start_from_zero_run_in_real_containers(
    setup: Setup,
) -> None:
    """Proves, on the real node: v2 deployed (a prebuilt image: v1's own, by its tag rather than
    its digest, a reference of its own to voicefleet) while a session runs on v1's pod serves
    every new session in a v2 container; the busy v1 pod is not deleted, nor its container
    stopped, until its session ended, whole and not dispatched again; a rollback runs v1's kept
    image in a new container with no build and no push; scaled to zero, a session dispatched
    with no pod waits for a container to start and runs there."""
    _, v1_pid = running_pod(setup, "v1")
    (v1_pod,) = live_pods(setup, "v1")
    v1 = {v["version"]: v for v in setup.get(f"/agents/{AGENT}/versions")}["v1"]
    live = dispatch(setup, "node-room-live", metadata="hold")
    v1_root = Path(f"/proc/{v1_pid}/root{MARKERS}")
    until((v1_root / f"{live}.started").exists, f"session {live} to start in v1's container")

    repository = f"vf/{AGENT}"
    v2_image = f"{setup.registry}/{repository}:{v1['source_digest']}"
    began = time.monotonic()
    deployed = setup.vf("deploy", "--image", v2_image)
    assert "v2 runs the prebuilt image" in deployed and "(no build)" in deployed, deployed
    assert "deploy to v2: complete" in deployed, deployed
    v2_pod, v2_pid = running_pod(setup, "v2")
    assert v2_pod["spec"]["containers"][0]["image"] == v2_image
    assert v2_pod["spec"]["nodeName"] == setup.node.name
    after = dispatch(setup, "node-room-v2")
    until(Path(f"/proc/{v2_pid}/root{MARKERS}/{after}.done").exists, "a session in v2's container")
    assert succeeded(setup, after)["version"] == "v2"
    print(f"real node: deploy -> a session run on v2: {time.monotonic() - began:.1f}s")

    # The busy v1 pod stays, not even terminating, its container running its session.
    time.sleep(3)  # a reaper that took busy pods too would have had its turn
    assert [p["metadata"]["uid"] for p in live_pods(setup, "v1")] == [v1_pod["metadata"]["uid"]]
    assert Path(f"/proc/{v1_pid}").exists()
    assert setup.get(f"/jobs/{live}")["state"] == "running"
    release(v1_root, live)
    done = succeeded(setup, live)
    assert (done["version"], done["redispatches"]) == ("v1", 0), done
    until(lambda: not Path(f"/proc/{v1_pid}").exists(), "v1's container to exit once idle")
    until(
        lambda: all(p["metadata"]["uid"] != v1_pod["metadata"]["uid"] for p in setup.pods()),
        "v1's pod to go once idle",
    )

    tags = images.tags(setup.registry, repository)
    builds = setup.server.log().count("building image")
    rolled = setup.vf("rollback")
    assert "rollback to v1: complete" in rolled, rolled
    back_pod, back_pid = running_pod(setup, "v1")
    assert back_pod["metadata"]["uid"] != v1_pod["metadata"]["uid"]  # a new container ...
    assert back_pod["spec"]["containers"][0]["image"] == v1["image"]  # ... of v1's kept image
    assert back_pod["status"]["containerStatuses"][0]["imageID"].endswith(v1["image_digest"])
    assert {v["version"] for v in setup.get(f"/agents/{AGENT}/versions")} == {"v1", "v2"}
    assert images.tags(setup.registry, repository) == tags  # nothing pushed
    assert setup.server.log().count("building image") == builds  # nothing built
    again = dispatch(setup, "node-room-rolled-back")
    until(Path(f"/proc/{back_pid}/root{MARKERS}/{again}.done").exists, "a session after rollback")
    assert succeeded(setup, again)["version"] == "v1"

    setup.vf(
        "scale", "--min", "0", "--max", "1", "--idle-to-zero", "2s", "--up-window", "1s",
        "--down-window", "30s",
    )  # fmt: skip
    until(lambda: not setup.pods(), "zero pods")
    until(lambda: not Path(f"/proc/{back_pid}").exists(), "the last container to exit")
    began = time.monotonic()
    cold = dispatch(setup, "node-room-cold")
    cold_pod, cold_pid = running_pod(setup, "v1")
    cold_root = Path(f"/proc/{cold_pid}/root{MARKERS}")
    until((cold_root / f"{cold}.started").exists, f"session {cold} to start in a new container")
    print(
        f"real node: cold start from zero pods, dispatch -> running: "
        f"{time.monotonic() - began:.1f}s"
    )
    assert cold_pod["spec"]["nodeName"] == setup.node.name
    assert succeeded(setup, cold)["version"] == "v1"
