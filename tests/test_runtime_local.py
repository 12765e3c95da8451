"""The local runtime with real child processes and real livekit-agents workers."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import httpx
import psutil
import pytest
from livekit import api

from tests.support import DEV_KEY, DEV_SECRET, MARKER_AGENT, Server, started, wait_for
from voicefleet.runtime import InstanceSpec, InstanceState, InstanceStatus
from voicefleet.runtime.local import LocalRuntime

# An agent as users write it: no port= anywhere, so `start` would bind :8081.
PLAIN_AGENT = """
from livekit.agents import JobContext, WorkerOptions, cli

async def entrypoint(ctx: JobContext) -> None:
    ctx.shutdown()

if __name__ == "__main__":
    cli.run_app(WorkerOptions(entrypoint_fnc=entrypoint, num_idle_processes=1))
"""


@pytest.fixture
async def runtime() -> AsyncIterator[LocalRuntime]:
    rt = LocalRuntime(backoff_initial=0.2, tick=0.1, stop_timeout=5)
    yield rt
    await rt.close(leave_running=False)


def spec(
    server: Server,
    workdir: Path,
    name: str,
    entry: str = "agent.py",
    log_dir: Path | None = None,
    **env: str,
) -> InstanceSpec:
    return InstanceSpec(
        instance_id=f"{name}-{os.urandom(3).hex()}",
        agent_id="CA_test",
        version="v1",
        workdir=workdir,
        python=Path(sys.executable),
        entry=entry,
        env={
            "LIVEKIT_URL": server.ws_url,
            "LIVEKIT_API_KEY": DEV_KEY,
            "LIVEKIT_API_SECRET": DEV_SECRET,
            "LIVEKIT_AGENT_NAME_OVERRIDE": name,
            **env,
        },
        log_dir=log_dir or workdir / "logs",
    )


async def a_call_in_flight(
    server: Server, runtime: LocalRuntime, tmp_path: Path, name: str, hold: float
) -> tuple[InstanceState, str]:
    """An instance of the marker agent (markers in tmp_path/markers) with one call running for
    `hold` seconds: its state and the call's job id."""
    markers = tmp_path / "markers"
    markers.mkdir()
    agent = spec(
        server, MARKER_AGENT.parent, name, entry=MARKER_AGENT.name,
        log_dir=tmp_path / "logs", MARKER_DIR=str(markers),
    )  # fmt: skip
    state = await runtime.start(agent)
    await wait_for(lambda: server.workers(name), 60, "the worker to register")
    lk = api.LiveKitAPI(server.url, DEV_KEY, DEV_SECRET)
    try:
        d = await lk.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(
                agent_name=name, room=f"{name}-call", metadata=json.dumps({"hold": hold})
            )
        )
    finally:
        await lk.aclose()
    job_id = d.state.jobs[0].id
    await wait_for(lambda: started(markers, job_id), 30, "the call to start")
    return state, job_id


async def test_two_instances_of_an_agent_without_a_port_both_start_on_ports_of_their_own(
    server: Server, runtime: LocalRuntime, tmp_path: Path
) -> None:
    (tmp_path / "agent.py").write_text(PLAIN_AGENT)
    states = [await runtime.start(spec(server, tmp_path, "plain")) for _ in range(2)]
    await wait_for(lambda: len(server.workers("plain")) == 2, 60, "both instances to register")
    await wait_for(
        lambda: all(s.status == InstanceStatus.READY for s in states), 30, "both to be healthy"
    )
    ports = {s.health_port for s in states}
    assert len(ports) == 2 and 8081 not in ports
    for port in ports:
        assert httpx.get(f"http://127.0.0.1:{port}/").text == "OK"
    for s in states:
        assert "registered worker" in s.log_path.read_text()


async def test_crashing_instance_is_restarted_with_backoff(
    server: Server, runtime: LocalRuntime, tmp_path: Path
) -> None:
    (tmp_path / "agent.py").write_text("import sys\nsys.exit('boom at import')\n")
    changes: list[InstanceStatus] = []
    runtime.on_change(lambda _, status: changes.append(status))
    state = await runtime.start(spec(server, tmp_path, "crashy"))
    await wait_for(lambda: state.restarts >= 3, 30, "three restarts")
    assert state.last_exit == 1
    assert InstanceStatus.FAILED in changes
    assert state.log_path.read_text().count("--- voicefleet: starting") >= 3
    assert "boom at import" in state.log_path.read_text()


READS_ITS_FILES = """
import json, os, pathlib, sys
folder = pathlib.Path(os.environ["VOICEFLEET_SECRETS_DIR"])
seen = {p.name: [p.read_text(), p.stat().st_mode & 0o777] for p in folder.iterdir()}
seen["."] = ["", folder.stat().st_mode & 0o777]
pathlib.Path(sys.argv[0]).with_name("seen.json").write_text(json.dumps(seen))
sys.exit("read them; now down, to be restarted")
"""


async def test_file_secrets_are_the_instances_own_and_go_when_it_stops(
    server: Server, runtime: LocalRuntime, tmp_path: Path
) -> None:
    (tmp_path / "agent.py").write_text(READS_ITS_FILES)
    folder = tmp_path / "data" / "secrets" / "inst"
    folder.mkdir(parents=True, mode=0o755)
    (folder / "stale.txt").write_text("a file secret unset since")  # from an earlier start
    s = replace(spec(server, tmp_path, "filed"), files={"key.pem": b"PEM"}, secrets_dir=folder)
    state = await runtime.start(s)
    seen_at = tmp_path / "seen.json"
    await wait_for(lambda: seen_at.exists() and state.restarts >= 1, 30, "a start and a crash")
    # Only the current files, owner-only, rewritten at each start.
    assert json.loads(seen_at.read_text()) == {"key.pem": ["PEM", 0o600], ".": ["", 0o700]}
    await runtime.stop(s.instance_id)
    assert not folder.exists()
    # A server restarted after its instance ended removes what the instance left.
    folder.mkdir()
    (folder / "key.pem").write_text("PEM")
    after_restart = LocalRuntime()
    try:
        assert await after_restart.adopt(s, 0, 0.0) is None
    finally:
        await after_restart.close(leave_running=True)
    assert not folder.exists()


async def test_a_node_worker_exiting_143_after_its_drain_stopped_and_did_not_fail(
    server: Server, runtime: LocalRuntime, tmp_path: Path
) -> None:
    """@livekit/agents for Node.js exits 143 once it has drained (its sessions finished): the
    end of a drain, not a crash (a crash moves the instance's sessions on, counts a restart)."""
    if shutil.which("node") is None:
        pytest.skip("node not found")
    script = (
        "process.on('SIGTERM', () => setTimeout(() => process.exit(143), 100));"
        "console.log('up'); setInterval(() => {}, 1000);"
    )
    changes: list[InstanceStatus] = []
    runtime.on_change(lambda _, status: changes.append(status))
    node = replace(spec(server, tmp_path, "node-drained"), command=("node", "-e", script))
    state = await runtime.start(node)
    await wait_for(lambda: "up" in state.log_path.read_text(), 30, "node to run")
    await runtime.drain(node.instance_id, grace=30)
    await wait_for(lambda: state.status == InstanceStatus.STOPPED, 30, "the drain to end")
    assert state.last_exit == 143
    assert InstanceStatus.FAILED not in changes, changes


async def test_drain_kills_only_after_the_grace_period(
    server: Server, runtime: LocalRuntime, tmp_path: Path
) -> None:
    markers = tmp_path / "markers"
    state, job_id = await a_call_in_flight(server, runtime, tmp_path, "graceful", hold=120)

    await runtime.drain(state.spec.instance_id, grace=3)
    assert state.status == InstanceStatus.DRAINING
    assert psutil.pid_exists(state.pid)  # SIGTERM only: the call goes on for now
    await wait_for(lambda: state.status == InstanceStatus.STOPPED, 30, "SIGKILL after grace")
    assert not (markers / f"{job_id}.done").exists()
    # This runtime is not the server's: to the server its worker died mid-call, so the call
    # waits for another worker (dispatched again, JRP_ON_FAILURE).
    job = await wait_for(
        lambda: (j := server.job(job_id)) and j["redispatches"] == 1 and j, 30, "redispatch"
    )
    assert job["state"] == "pending", job


async def test_adoption_takes_back_the_same_process_and_refuses_a_reused_pid_or_another_folder(
    server: Server, runtime: LocalRuntime, tmp_path: Path
) -> None:
    (tmp_path / "agent.py").write_text(PLAIN_AGENT)
    s = spec(server, tmp_path, "adoptee")
    state = await runtime.start(s)
    await wait_for(lambda: state.status == InstanceStatus.READY, 60, "the instance to be healthy")

    after_restart = LocalRuntime(tick=0.1)
    try:
        assert await after_restart.adopt(s, state.pid, state.started_at - 100) is None
        # The same records in another data dir (a restored backup): the process is not its.
        elsewhere = tmp_path / "restored" / "src"
        elsewhere.mkdir(parents=True)
        copy = dataclasses.replace(s, workdir=elsewhere)
        assert await after_restart.adopt(copy, state.pid, state.started_at) is None
        adopted = await after_restart.adopt(s, state.pid, state.started_at)
        assert adopted is not None and adopted.health_port == state.health_port
        await wait_for(lambda: adopted.status == InstanceStatus.READY, 30, "adopted health")
    finally:
        await after_restart.close(leave_running=True)
    assert psutil.pid_exists(state.pid)  # leave_running: the instance outlives its runtime


async def test_an_instance_drained_while_it_waits_to_restart_stays_down(
    server: Server, runtime: LocalRuntime, tmp_path: Path
) -> None:
    (tmp_path / "agent.py").write_text("import sys\nsys.exit('boom at import')\n")
    state = await runtime.start(spec(server, tmp_path, "drained-crashy"))
    await wait_for(lambda: state.restarts >= 2, 30, "two restarts")
    await wait_for(lambda: state.status == InstanceStatus.FAILED, 30, "a crash")
    await runtime.drain(state.spec.instance_id, grace=10)  # during its restart backoff
    await wait_for(lambda: state.status == InstanceStatus.STOPPED, 10, "it to stay down")
    restarts = state.restarts
    await asyncio.sleep(2)  # longer than the backoff it was waiting out
    assert state.restarts == restarts and state.status == InstanceStatus.STOPPED


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


CRASHES_ONCE = """
import pathlib, sys, time
here = pathlib.Path(sys.argv[0]).parent
if not (here / "crashed").exists():
    (here / "crashed").write_text("")
    sys.exit("down once")
time.sleep(600)
"""


@pytest.mark.parametrize("how", ["drain", "stop"])
async def test_an_instance_drained_or_stopped_while_it_is_being_started_again_ends(
    server: Server,
    runtime: LocalRuntime,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    how: str,
) -> None:
    """Told to drain or stop while its process is being started again after a crash (in the
    middle of the spawn, held open here): the new process must get the signal, not run on."""
    (tmp_path / "agent.py").write_text(CRASHES_ONCE)
    state = await runtime.start(spec(server, tmp_path, f"respawned-{how}"))
    first = state.pid
    spawning, go_on = asyncio.Event(), asyncio.Event()
    real_exec = asyncio.create_subprocess_exec

    async def held(*args: object, **kwargs: object) -> asyncio.subprocess.Process:
        spawning.set()
        await go_on.wait()
        return await real_exec(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(asyncio, "create_subprocess_exec", held)
    await asyncio.wait_for(spawning.wait(), 30)  # it crashed; its restart is under way
    if how == "drain":
        await runtime.drain(state.spec.instance_id, grace=30)
    else:
        await runtime.stop(state.spec.instance_id)
    go_on.set()
    await wait_for(lambda: state.pid != first, 10, "the new process")
    await wait_for(lambda: gone(state.pid), 20, "the new process to end")
    await wait_for(lambda: state.status == InstanceStatus.STOPPED, 10, "it to be stopped")


async def test_a_drain_taken_over_after_a_server_restart_signals_nothing_and_the_call_ends(
    server: Server, runtime: LocalRuntime, tmp_path: Path
) -> None:
    markers = tmp_path / "markers"
    state, job_id = await a_call_in_flight(server, runtime, tmp_path, "redrained", hold=4)
    agent = state.spec
    await runtime.drain(state.spec.instance_id, grace=60)  # SIGTERM: the call goes on

    # The server restarts; the next one adopts the draining instance and takes the drain over.
    # livekit-agents exits at once on a second SIGTERM, so it must get none.
    after_restart = LocalRuntime(tick=0.1)
    try:
        adopted = await after_restart.adopt(agent, state.pid, state.started_at)
        assert adopted is not None
        await after_restart.drain(agent.instance_id, grace=60, signalled=True)
        job = await wait_for(
            lambda: (j := server.job(job_id)) and j["state"] in ("succeeded", "failed") and j,
            60,
            "the call to end",
        )
        assert job["state"] == "succeeded" and (markers / f"{job_id}.done").exists(), job
        await wait_for(lambda: adopted.status == InstanceStatus.STOPPED, 30, "the exit")
    finally:
        await after_restart.close(leave_running=False)
