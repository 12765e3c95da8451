"""Deploys, rollbacks and secrets with real processes: `vf agent …`, the local runtime, builds.

The agent is tests/agents/deployable, copied to a temp folder; its instances are real
livekit-agents 1.8.9 workers in uv-built environments, started by the server's local runtime.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from livekit import api

from tests.support import DEV_KEY, DEV_SECRET, ROOT, Seen, Server, admin_token, started, wait_for

AGENT_SRC = ROOT / "tests" / "agents" / "deployable"
SECRET = "s3cr3t-value-that-must-never-show"


def vf_env(server: Server) -> dict[str, str]:
    return {**os.environ, "VF_URL": server.url, "VF_API_KEY": DEV_KEY, "VF_API_SECRET": DEV_SECRET}


def vf(
    server: Server, folder: Path, *args: str, ok: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "voicefleet", "agent", *args],
        cwd=folder,
        env=vf_env(server),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if ok:
        assert result.returncode == 0, (
            f"vf agent {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
        )
    return result


def deploy_v1(server: Server, agent_dir: Path, tmp_path: Path) -> Path:
    """my-agent created, its MARKER_DIR secret set and v1 deployed: the markers folder."""
    markers = tmp_path / "markers"
    markers.mkdir()
    vf(server, agent_dir, "create")
    vf(server, agent_dir, "secrets", "set", f"MARKER_DIR={markers}")
    vf(server, agent_dir, "deploy")
    return markers


def api_get(server: Server, path: str) -> Any:
    r = httpx.get(
        f"{server.url}/api/v1{path}",
        headers={"Authorization": f"Bearer {admin_token()}"},
        timeout=30,
    )
    r.raise_for_status()
    return r.json()


@pytest.fixture
def agent_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "my-agent"
    shutil.copytree(AGENT_SRC, folder)
    (folder / "VERSION").write_text("one")
    return folder


async def dispatch(
    lk: api.LiveKitAPI, room: str, hold: float = 0, until_released: bool = False
) -> str:
    """A session of my-agent; with `until_released` it lasts until tests.support.release."""
    meta = {"hold": hold, **({"until_released": True} if until_released else {})}
    d = await lk.agent_dispatch.create_dispatch(
        api.CreateAgentDispatchRequest(agent_name="my-agent", room=room, metadata=json.dumps(meta))
    )
    return d.state.jobs[0].id


def all_stopped(
    server: Server, *versions: str, agent: str = "my-agent"
) -> Callable[[], bool | Seen]:
    """A check: every instance of these versions of `agent` has stopped. Not yet: the ones
    still up, their sessions and the end of their output (why a drain did not end)."""

    def check() -> bool | Seen:
        up = [
            i
            for i in api_get(server, f"/agents/{agent}")["instances"]
            if i["version"] in versions and i["status"] != "stopped"
        ]
        if not up:
            return True
        seen = []
        for i in up:
            out = httpx.get(
                f"{server.url}/api/v1/agents/{agent}/logs",
                params={"instance": i["id"]},
                headers={"Authorization": f"Bearer {admin_token()}"},
                timeout=30,
            ).text
            tail = "\n    ".join(out.splitlines()[-15:])
            seen.append(f"{i['id']} {i['status']} sessions={i.get('sessions')}:\n    {tail}")
        return Seen("\n".join(seen))

    return check


def cached_builds(server: Server) -> float:
    """How many of my-agent's builds reused a cached environment, as /metrics counts them."""
    series = 'voicefleet_build_duration_seconds_count{agent="my-agent",result="cached"} '
    for line in httpx.get(f"{server.url}/metrics", timeout=30).text.splitlines():
        if line.startswith(series):
            return float(line.removeprefix(series))
    return 0.0


def job_state(server: Server, job_id: str, *states: str) -> Callable[[], dict[str, Any] | None]:
    return lambda: ((j := server.job(job_id)) and j["state"] in states and j) or None


async def test_deploy_during_20_live_sessions_finishes_them_all_and_rollback_needs_no_build(
    start_server: Callable[..., Server], agent_dir: Path, tmp_path: Path
) -> None:
    server = start_server("--keep-warm", "1")
    markers = tmp_path / "markers"
    markers.mkdir()
    vf(server, agent_dir, "create")
    vf(server, agent_dir, "secrets", "set", f"MARKER_DIR={markers}", f"VF_TEST_SECRET={SECRET}")
    vf(server, agent_dir, "scale", "2")
    first = vf(server, agent_dir, "deploy")
    assert "v1" in first.stdout

    status = api_get(server, "/agents/my-agent")
    v1_instances = {i["id"] for i in status["instances"] if i["status"] in ("ready", "starting")}
    assert len(v1_instances) == 2

    lk = api.LiveKitAPI(server.url, DEV_KEY, DEV_SECRET)
    try:
        calls = [await dispatch(lk, f"call-{i}", hold=15) for i in range(20)]
        for job_id in calls:
            await wait_for(lambda j=job_id: started(markers, j), 60, f"call {job_id} to start")
        assert {started(markers, j)["version"] for j in calls} == {"v1"}  # type: ignore[index]
        assert {started(markers, j)["secret"] for j in calls} == {SECRET}  # type: ignore[index]

        (agent_dir / "VERSION").write_text("two")
        cached_before = cached_builds(server)  # v1's too, if another test built its environment
        second = vf(server, agent_dir, "deploy")
        assert "v2" in second.stdout
        assert "reused cached environment" in second.stdout  # same requirements: no reinstall
        assert cached_builds(server) == cached_before + 1  # and /metrics counts it as such

        after = [await dispatch(lk, f"after-{i}") for i in range(6)]
        for job_id in after:
            job = await wait_for(job_state(server, job_id, "succeeded", "failed"), 60, job_id)
            # Served by v2 to its end. (Not the exit status: livekit-agents 1.8.9 now and then
            # reports a finished job failed when its process exits 255 after ctx.shutdown().)
            assert job["version"] == "v2", job
            assert (markers / f"{job_id}.done").exists(), job

        # Every call that was in flight during the deploy finishes normally on v1.
        for job_id in calls:
            job = await wait_for(job_state(server, job_id, "succeeded", "failed"), 60, job_id)
            assert job["state"] == "succeeded", job
            assert job["version"] == "v1"
            assert (markers / f"{job_id}.done").exists()

        # The replaced v1 instances are retired (no new sessions, calls go on), then drained
        # and stopped once idle: they exit by themselves.
        await wait_for(
            lambda: all(
                i["status"] == "stopped"
                for i in api_get(server, "/agents/my-agent")["instances"]
                if i["id"] in v1_instances
            ),
            60,
            "the v1 instances to stop after draining",
        )

        def builds() -> list[tuple[str, float]]:
            return [
                (v["version"], v["built_at"]) for v in api_get(server, "/agents/my-agent/versions")
            ]

        builds_before = builds()
        rolled = vf(server, agent_dir, "rollback")
        assert "rollback to v1: complete" in rolled.stdout
        assert builds() == builds_before  # no new version, nothing rebuilt
        back = await dispatch(lk, "back-on-v1")
        job = await wait_for(job_state(server, back, "succeeded"), 60, "a session on v1")
        assert job["version"] == "v1"
    finally:
        await lk.aclose()

    # The secret reached the agent, and nothing else: no API response, log or CLI output.
    listed = vf(server, agent_dir, "secrets", "list")
    everything = [
        first.stdout, first.stderr, second.stdout, second.stderr, listed.stdout, server.log(),
        json.dumps(api_get(server, "/agents/my-agent")),
        json.dumps(api_get(server, "/agents/my-agent/secrets")),
        json.dumps(api_get(server, "/agents/my-agent/events")),
    ]  # fmt: skip
    for text in everything:
        assert SECRET not in text


def test_hostile_bundle_and_broken_livekit_toml_get_clear_errors(
    server: Server, agent_dir: Path, tmp_path: Path
) -> None:
    vf(server, agent_dir, "create", "--name", "hostile")
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("../../escape.py")
        data = b"print('owned')"
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    r = httpx.post(
        f"{server.url}/api/v1/agents/hostile/versions",
        content=evil.read_bytes(),
        headers={"Authorization": f"Bearer {admin_token()}", "Content-Type": "application/gzip"},
    )
    assert r.status_code == 400, r.text
    assert "escape.py" in r.json()["detail"]
    assert not (tmp_path / "escape.py").exists()
    assert api_get(server, "/agents/hostile/versions") == []
    # A NUL in a secret would make every instance of the agent fail to start: refused.
    r = httpx.put(
        f"{server.url}/api/v1/agents/hostile/secrets",
        json={"secrets": {"TOKEN": "abc\u0000def"}},
        headers={"Authorization": f"Bearer {admin_token()}"},
    )
    assert r.status_code == 400 and "NUL" in r.json()["detail"], r.text
    assert api_get(server, "/agents/hostile/secrets") == []

    (agent_dir / "livekit.toml").write_text("[agent\nid = ")
    broken = vf(server, agent_dir, "status", ok=False)
    assert broken.returncode == 2
    assert "livekit.toml is not valid TOML" in broken.stderr


async def test_crashing_version_is_aborted_and_the_previous_one_keeps_serving(
    start_server: Callable[..., Server], agent_dir: Path, tmp_path: Path
) -> None:
    server = start_server()
    deploy_v1(server, agent_dir, tmp_path)

    (agent_dir / "CRASH").write_text("yes")
    broken = vf(server, agent_dir, "deploy", ok=False)
    assert broken.returncode == 1
    assert "rollout of v2 aborted" in broken.stderr and "crashed while starting" in broken.stderr

    logs = vf(server, agent_dir, "logs")
    assert "this version is broken on purpose" in logs.stdout  # the crash, as the agent said it
    assert "registered worker" in logs.stdout  # and v1's instance, serving
    # An instance id, not a path: the server's own log (<data>/server.log) stays out of reach.
    escape = vf(server, agent_dir, "logs", "--instance", "../../server", ok=False)
    assert escape.returncode == 4 and "no logs for instance" in escape.stderr, escape

    status = api_get(server, "/agents/my-agent")
    assert status["deployments"][0]["version"] == "v1"
    assert {i["status"] for i in status["instances"] if i["version"] == "v2"} == {"stopped"}
    lk = api.LiveKitAPI(server.url, DEV_KEY, DEV_SECRET)
    try:
        job_id = await dispatch(lk, "still-v1")
        job = await wait_for(job_state(server, job_id, "succeeded"), 60, "a session on v1")
        assert job["version"] == "v1"
    finally:
        await lk.aclose()


async def test_server_restart_mid_rollout_adopts_instances_resumes_and_cuts_no_session(
    start_server: Callable[..., Server], agent_dir: Path, tmp_path: Path
) -> None:
    server = start_server()
    markers = deploy_v1(server, agent_dir, tmp_path)
    [v1] = api_get(server, "/agents/my-agent")["instances"]

    lk = api.LiveKitAPI(server.url, DEV_KEY, DEV_SECRET)
    calls = [await dispatch(lk, f"call-{i}", hold=20) for i in range(3)]
    await lk.aclose()
    for job_id in calls:
        await wait_for(lambda j=job_id: started(markers, j), 60, f"call {job_id} to start")

    # Start the v2 rollout, and stop the server while it waits for v2 to come up.
    (agent_dir / "VERSION").write_text("two")
    deploy = subprocess.Popen(
        [sys.executable, "-m", "voicefleet", "agent", "deploy"],
        cwd=agent_dir,
        env={**os.environ, "VF_URL": server.url},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    await wait_for(
        lambda: any(r["step"] == "wait" for r in api_get(server, "/agents/my-agent")["rollouts"]),
        60,
        "the rollout to wait for v2",
        interval=0.1,
    )
    port = int(server.url.rsplit(":", 1)[1])
    server.stop(leave_instances=True)
    deploy.wait(30)
    assert psutil.pid_exists(v1["pid"]), "v1 must keep serving while the server is down"

    again = start_server(data_dir=server.data_dir, port=port)
    rollout = await wait_for(
        lambda: (
            (r := api_get(again, "/agents/my-agent")["rollouts"][0])["state"] != "progressing" and r
        ),
        120,
        "the resumed rollout to finish",
        interval=0.5,
    )
    assert rollout["state"] == "complete" and rollout["to_version"] == "v2", rollout

    for job_id in calls:
        job = await wait_for(job_state(again, job_id, "succeeded", "failed"), 90, job_id)
        assert job["state"] == "succeeded", job
        assert (markers / f"{job_id}.done").exists()
    lk = api.LiveKitAPI(again.url, DEV_KEY, DEV_SECRET)
    try:
        job_id = await dispatch(lk, "after-restart")
        assert (await wait_for(job_state(again, job_id, "succeeded"), 60, "v2"))["version"] == "v2"
    finally:
        await lk.aclose()
        # The adopted instances are not the new server's children: end them here.
        for instance in api_get(again, "/agents/my-agent")["instances"]:
            if instance["pid"] > 0 and instance["status"] != "stopped":
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(instance["pid"], signal.SIGKILL)


async def test_rollback_within_keep_warm_takes_the_running_instances_back(
    start_server: Callable[..., Server], agent_dir: Path, tmp_path: Path
) -> None:
    server = start_server()  # keep-warm: 60 s
    deploy_v1(server, agent_dir, tmp_path)
    [v1] = api_get(server, "/agents/my-agent")["instances"]
    (agent_dir / "VERSION").write_text("two")
    vf(server, agent_dir, "deploy")
    retired = [i for i in api_get(server, "/agents/my-agent")["instances"] if i["id"] == v1["id"]]
    assert retired[0]["status"] == "retiring"

    vf(server, agent_dir, "rollback")
    instances = {i["id"]: i for i in api_get(server, "/agents/my-agent")["instances"]}
    assert instances[v1["id"]]["status"] == "ready" and instances[v1["id"]]["pid"] == v1["pid"]
    assert len([i for i in instances.values() if i["version"] == "v1"]) == 1  # none started
    lk = api.LiveKitAPI(server.url, DEV_KEY, DEV_SECRET)
    try:
        job_id = await dispatch(lk, "back-to-warm-v1")
        job = await wait_for(job_state(server, job_id, "succeeded"), 60, "a session on v1")
        assert job["instance"] == v1["id"]
    finally:
        await lk.aclose()


async def test_one_rollout_at_a_time_a_deploy_in_the_way_says_why_and_hangs_nothing(
    start_server: Callable[..., Server], agent_dir: Path
) -> None:
    server = start_server()

    def versions() -> dict[str, Any]:
        return {v["version"]: v for v in api_get(server, "/agents/my-agent/versions")}

    vf(server, agent_dir, "create")
    vf(server, agent_dir, "deploy")
    (agent_dir / "VERSION").write_text("two")
    vf(server, agent_dir, "deploy")

    # v3 needs an environment of its own, so its build takes seconds; meanwhile a canary of
    # v1 begins. The build ends, its rollout is refused, and the deploy says so at once.
    (agent_dir / "requirements.txt").write_text("livekit-agents==1.8.9\nsix==1.16.0\n")
    (agent_dir / "VERSION").write_text("three")
    deploy = subprocess.Popen(
        [sys.executable, "-m", "voicefleet", "agent", "deploy"],
        cwd=agent_dir,
        env=vf_env(server),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        await wait_for(lambda: "v3" in versions(), 60, "v3 uploaded", interval=0.05)
        assert versions()["v3"]["status"] == "building"
        out = vf(server, agent_dir, "deploy", "--version", "v1", "--canary", "10")
        assert "canary v1 takes 10% of new sessions" in out.stdout, out.stdout
        _, err = deploy.communicate(timeout=240)
    finally:
        deploy.kill()
    assert deploy.returncode == 1, err
    assert "v3 built, not rolled out: canary rollout" in err, err
    assert "vf agent deploy --version v3" in err, err
    assert versions()["v3"]["status"] == "ready"
    assert "v3: built, not rolled out" in vf(server, agent_dir, "versions").stdout

    # While the canary runs, a deploy is refused before anything is uploaded or built.
    (agent_dir / "VERSION").write_text("four")
    refused = vf(server, agent_dir, "deploy", ok=False)
    assert refused.returncode == 1, refused.stderr
    assert "promote or abort it first" in refused.stderr, refused.stderr
    assert set(versions()) == {"v1", "v2", "v3"}
    status = api_get(server, "/agents/my-agent")
    assert status["deployments"][0]["version"] == "v2"  # stable serves on


async def test_a_failed_rollout_lets_go_only_of_what_it_started_and_cuts_no_session(
    start_server: Callable[..., Server], agent_dir: Path, tmp_path: Path
) -> None:
    server = start_server()
    deploy_v1(server, agent_dir, tmp_path)
    [good] = api_get(server, "/agents/my-agent")["instances"]
    lk = api.LiveKitAPI(server.url, DEV_KEY, DEV_SECRET)
    try:
        call = await dispatch(lk, "held-through-the-failure", hold=20)
        await wait_for(job_state(server, call, "running"), 60, "the call running")
        # A second instance that crashes at start (secrets reach new instances only)...
        vf(server, agent_dir, "secrets", "set", "CRASH_AT_START=1")
        vf(server, agent_dir, "scale", "2")
        # ...then a rollout of the serving version gathers both and fails on the broken one.
        failed = vf(server, agent_dir, "deploy", "--version", "v1", ok=False)
        assert failed.returncode == 1 and "crashed while starting" in failed.stderr, failed.stderr
        instances = {i["id"]: i for i in api_get(server, "/agents/my-agent")["instances"]}
        # The instance that was serving before the rollout still serves, same process.
        assert instances[good["id"]]["status"] == "ready", instances
        assert instances[good["id"]]["pid"] == good["pid"]
        job = await wait_for(job_state(server, call, "succeeded", "failed"), 60, "the call")
        assert job["state"] == "succeeded" and job["instance"] == good["id"], job
    finally:
        await lk.aclose()


async def test_a_call_outliving_the_drain_grace_period_ends_there_and_is_not_started_again(
    start_server: Callable[..., Server], agent_dir: Path, tmp_path: Path
) -> None:
    """The grace period is the operator's bound on a drain: at its end voicefleet kills the
    old instance, and the call it still ran fails saying so. Unlike a crash (dispatched again:
    tests/test_redispatch_calls.py), it is not started again on the new version."""
    server = start_server("--keep-warm", "1")
    markers = tmp_path / "markers"
    markers.mkdir()
    vf(server, agent_dir, "create", "--grace-period", "4")
    vf(server, agent_dir, "secrets", "set", f"MARKER_DIR={markers}")
    vf(server, agent_dir, "deploy")
    lk = api.LiveKitAPI(server.url, DEV_KEY, DEV_SECRET)
    try:
        call = await dispatch(lk, "call-past-grace", until_released=True)
        await wait_for(lambda: started(markers, call), 60, "the call to start")
        (agent_dir / "VERSION").write_text("two")
        vf(server, agent_dir, "deploy")
        job = await wait_for(job_state(server, call, "failed"), 60, "the call to end at the grace")
        assert "was stopped while the job ran" in job["error"], job
        assert job["redispatches"] == 0 and job["version"] == "v1", job
        assert started(markers, call)["version"] == "v1"  # type: ignore[index]
    finally:
        await lk.aclose()
