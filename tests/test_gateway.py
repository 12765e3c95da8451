"""Gateway mode against the real livekit-server: `vf server --livekit-url … --livekit-api-key …
--livekit-api-secret …` registers with it as a worker, and real livekit-agents workers registered
with voicefleet (not with LiveKit) serve LiveKit's own dispatches.

Everything that talks to the LiveKit server (it, the `vf server`, the workers, the livekit-api
client) runs inside the rig's network namespace (tests/livekit.py). Skipped, saying why, only
when livekit-server is not built and cannot be built here."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import jwt
import pytest
from livekit import api
from livekit.protocol import models

from tests.livekit import (
    BinaryUnavailable,
    LiveKitServer,
    NsVoicefleet,
    NsWorker,
    livekit_server,
    server_binary,
    server_built,
)
from tests.support import DEV_SECRET, MARKER_AGENT, NO_REASON, wait_for
from voicefleet.dispatch.registry import PoolKey, PoolLoad, Worker, pool_load
from voicefleet.dispatch.routing import RoutingTable
from voicefleet.gateway.target import backoff
from voicefleet.protocol import tokens

ROOM_AGENT = Path(__file__).parent / "agents" / "room_agent.py"

pytestmark = pytest.mark.timeout(240 if server_built() else 1800)


@pytest.fixture(scope="module")
def lk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveKitServer]:
    try:
        binary = server_binary()
    except BinaryUnavailable as e:
        pytest.skip(f"livekit-server is not built and cannot be built here: {e}")
    with livekit_server(tmp_path_factory.mktemp("livekit"), binary=binary) as server:
        print(f"livekit-server in {server.ns.name}: log {server.log_path}")
        yield server


@pytest.fixture(scope="module")
def vf(lk: LiveKitServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NsVoicefleet]:
    server = NsVoicefleet(lk, tmp_path_factory.mktemp("voicefleet"), log_level="debug")
    print(f"vf server log: {server.log_path}")
    try:
        yield server.started()
    finally:
        server.stop()


@pytest.fixture
def start_worker(
    lk: LiveKitServer, vf: NsVoicefleet, tmp_path: Path
) -> Iterator[Callable[..., NsWorker]]:
    """A real livekit-agents worker in the namespace, registered with voicefleet; killed after."""
    workers: list[NsWorker] = []

    def start(script: Path, agent_name: str, markers: Path, **env: str) -> NsWorker:
        markers.mkdir(parents=True, exist_ok=True)
        log = tmp_path / f"worker-{agent_name}-{len(workers)}.log"
        worker = NsWorker(
            lk,
            script,
            log,
            vf.worker_env(MARKER_DIR=str(markers), AGENT_NAME=agent_name, **env),
        )
        print(f"worker {script.name} ({agent_name}): log {log}")
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


async def dispatch_with(
    client: api.LiveKitAPI, request: api.CreateAgentDispatchRequest
) -> api.AgentDispatch:
    return await client.agent_dispatch.create_dispatch(request)


def markers_of(folder: Path, suffix: str) -> list[dict[str, Any]]:
    found = []
    for path in sorted(folder.glob(f"*.{suffix}")):
        try:
            found.append(json.loads(path.read_text()))
        except ValueError:
            continue  # still being written
    return found


def upstream_registrations(lk: LiveKitServer, agent_name: str) -> int:
    """How many times a worker registered with LiveKit for `agent_name` (LiveKit's own log)."""
    return sum(1 for e in lk.log_entries("worker registered") if e.get("agentName") == agent_name)


async def registered_upstream(lk: LiveKitServer, agent_name: str, times: int = 1) -> None:
    await wait_for(
        lambda: upstream_registrations(lk, agent_name) >= times,
        30,
        f"voicefleet to register with LiveKit for {agent_name} ({times}x)",
    )


async def job_state(vf: NsVoicefleet, job_id: str, *states: str) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        job = await vf.job(job_id)
        return job if job is not None and job["state"] in states else None

    found: dict[str, Any] = await wait_for(check, 30, f"job {job_id} in {states}", interval=0.2)
    return found


def test_a_pool_reports_its_share_in_use_and_is_full_only_when_no_worker_takes_jobs() -> None:
    def worker(load: float, *, full: bool = False, draining: bool = False) -> Worker:
        w = Worker(
            id=f"AW_{load}",
            key=PoolKey("a", "", 0),
            sdk_version="",
            deployment="",
            api_key="",
            identity=tokens.UNMANAGED,
            permissions=models.ParticipantPermission(),
        )
        w.load, w.reported_full, w.draining = load, full, draining
        return w

    assert pool_load([]) == PoolLoad(load=1.0, available=False, jobs=0)
    half = pool_load([worker(0.5), worker(0.0, full=True)])
    assert half.available and half.load == 0.75  # the full one is a share in use
    assert pool_load([worker(0.2), worker(0.4)]).load == pytest.approx(0.3)
    stuck = pool_load([worker(0.1, full=True), worker(0.0, draining=True)])
    assert not stuck.available and stuck.load == 1.0


def test_reconnection_waits_double_each_failure_up_to_a_cap() -> None:
    assert [backoff(n, 0.5, 30) for n in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert backoff(10_000, 0.5, 30) == 30  # no overflow however long LiveKit stays away


async def test_a_livekit_dispatch_reaches_a_voicefleet_worker_whose_agent_joins_the_room(
    lk: LiveKitServer, vf: NsVoicefleet, start_worker: Callable[..., NsWorker], tmp_path: Path
) -> None:
    markers = tmp_path / "markers"
    worker = start_worker(ROOM_AGENT, "gw-room", markers)
    worker_id = await wait_for(worker.registered, 60, "room_agent to register with voicefleet")
    await registered_upstream(lk, "gw-room")

    room = "gw-explicit"
    dispatch = await lk.call(
        lambda c: c.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(
                agent_name="gw-room", room=room, metadata=json.dumps({"timeout": 120})
            )
        )
    )

    def joined() -> dict[str, Any] | None:
        return next((m for m in markers_of(markers, "joined") if m["room"] == room), None)

    agent = await wait_for(joined, 60, "the agent to join the LiveKit room")
    assert agent["url"] == lk.ws_url  # LiveKit's room, not voicefleet's address

    # voicefleet placed LiveKit's job (same id and dispatch) on its own worker.
    job = await job_state(vf, agent["job_id"], "running")
    assert job["dispatch_id"] == dispatch.id
    assert job["worker_id"] == worker_id
    assert job["room"] == room

    # LiveKit sees the agent in the room, as the worker LiveKit assigned the job to.
    listed = await lk.call(
        lambda c: c.room.list_participants(api.ListParticipantsRequest(room=room))
    )
    [participant] = [p for p in listed.participants if p.identity == agent["identity"]]
    assert participant.kind == api.ParticipantInfo.Kind.AGENT
    assert participant.attributes.get("lk.agent_name") == "gw-room"
    # LiveKit assigned its job to voicefleet's registration for the agent.
    gateway = {
        e["workerID"] for e in lk.log_entries("worker registered") if e["agentName"] == "gw-room"
    }
    [assigned] = [e for e in lk.log_entries("assigned job to worker") if e["room"] == room]
    assert assigned["jobID"] == agent["job_id"] and assigned["workerID"] in gateway
    assert assigned["workerID"] != worker_id  # LiveKit's id of voicefleet, not the worker's

    # The room ends on LiveKit's side: the call ends here too.
    await lk.call(lambda c: c.room.delete_room(api.DeleteRoomRequest(room=room)))
    await wait_for(lambda: (markers / f"{agent['job_id']}.done").exists(), 30, "the job to end")
    await job_state(vf, agent["job_id"], "succeeded", "failed", "terminated")


async def test_a_room_created_with_agents_gets_a_voicefleet_worker_with_livekits_own_token(
    lk: LiveKitServer, vf: NsVoicefleet, start_worker: Callable[..., NsWorker], tmp_path: Path
) -> None:
    markers = tmp_path / "markers"
    worker = start_worker(MARKER_AGENT, "gw-marker", markers)
    await wait_for(worker.registered, 60, "marker_agent to register with voicefleet")
    await registered_upstream(lk, "gw-marker")

    room = "gw-created"
    await lk.call(
        lambda c: c.room.create_room(
            api.CreateRoomRequest(
                name=room,
                agents=[
                    api.RoomAgentDispatch(
                        agent_name="gw-marker", metadata=json.dumps({"until_released": True})
                    )
                ],
            )
        )
    )

    def started() -> dict[str, Any] | None:
        return next((m for m in markers_of(markers, "started") if m["room"] == room), None)

    job = await wait_for(started, 30, "the room's agent job to start on the voicefleet worker")
    assert job["url"] == lk.ws_url
    # The room token LiveKit minted, passed through unchanged: signed with LiveKit's key, valid
    # for LiveKit's hour (voicefleet's own are valid 6 h), with LiveKit's metrics grant.
    claims = jwt.decode(job["token"], lk.api_secret, algorithms=["HS256"])
    assert claims["iss"] == lk.api_key
    assert claims["exp"] - claims["nbf"] == 3600, claims
    assert claims["video"]["room"] == room and claims["video"]["roomJoin"] is True
    assert "canSubscribeMetrics" in claims["video"], claims
    assert claims["sub"] == f"agent-{job['job_id']}"

    assert (await job_state(vf, job["job_id"], "running"))["room"] == room
    (markers / f"{job['job_id']}.release").write_text("release")
    ended = await job_state(vf, job["job_id"], "succeeded", "failed")
    if ended["state"] == "failed":
        assert ended["error"] == NO_REASON, ended  # livekit-agents' exit-status race (support.py)
    # The worker's job updates reach LiveKit, which ends the job on its side too.
    await wait_for(
        lambda: any(e["jobID"] == job["job_id"] for e in lk.log_entries("job ended")),
        30,
        "LiveKit to hear that the job ended",
    )
    await lk.call(lambda c: c.room.delete_room(api.DeleteRoomRequest(room=room)))


async def test_routing_weights_split_livekits_jobs_between_versions_by_dispatch(
    lk: LiveKitServer, vf: NsVoicefleet, start_worker: Callable[..., NsWorker], tmp_path: Path
) -> None:
    agent_name = "gw-split"
    weights = {"v1": 70.0, "v2": 30.0}
    assert (
        await vf.request("PUT", f"/api/v1/routing/{agent_name}", json={"weights": weights})
        == weights
    )
    markers: dict[str, Path] = {}
    for version in weights:
        key, secret = tokens.instance_credentials(
            DEV_SECRET,
            tokens.WorkerIdentity(agent="CA_gwsplit", version=version, instance=f"gw-{version}"),
        )
        markers[version] = tmp_path / version
        worker = start_worker(
            MARKER_AGENT,
            agent_name,
            markers[version],
            LIVEKIT_API_KEY=key,
            LIVEKIT_API_SECRET=secret,
        )
        await wait_for(worker.registered, 60, f"the {version} worker to register")
    await registered_upstream(lk, agent_name)
    # The version voicefleet's routing table gives each dispatch (a hash of its id).
    table = RoutingTable()
    table.set_weights(agent_name, weights)

    served: dict[str, list[str]] = {version: [] for version in weights}
    for n in range(20):
        request = api.CreateAgentDispatchRequest(
            agent_name=agent_name, room=f"gw-split-{n}", metadata="{}"
        )
        dispatch = await lk.call(partial(dispatch_with, request=request))

        def landed(dispatch_id: str = dispatch.id) -> str | None:
            for version, folder in markers.items():
                if any(m["dispatch_id"] == dispatch_id for m in markers_of(folder, "started")):
                    return version
            return None

        version = await wait_for(landed, 30, f"the job of {dispatch.id} to start")
        route = table.choose(agent_name, "", dispatch.id)
        assert route is not None and version == route.version, (dispatch.id, version, route)
        served[version].append(dispatch.id)
        if n >= 3 and all(served.values()):
            break
    assert all(served.values()), served  # both versions served LiveKit's jobs, by the table


async def test_a_wrong_livekit_secret_is_said_at_start_and_retried_and_voicefleet_serves_on(
    lk: LiveKitServer, tmp_path: Path
) -> None:
    wrong = NsVoicefleet(lk, tmp_path / "wrong", api_secret="not-" + lk.api_secret)
    try:
        wrong.started()
        refused = f"LiveKit at {lk.ws_url} refused API key '{lk.api_key}' (HTTP 401"
        await wait_for(lambda: refused in wrong.log(), 30, "the refusal in the log")
        await wait_for(lambda: wrong.log().count(refused) >= 2, 30, "a retry, refused again")
        assert "check --livekit-api-key and --livekit-api-secret" in wrong.log()
        assert "eyJ" not in wrong.log()  # LiveKit quotes the refused token: not logged
        # Still serving: its API answers, and it is not a crash.
        assert await wrong.request("GET", "/api/v1/workers") == []
        assert wrong.proc.poll() is None
    finally:
        wrong.stop()


def kill_upstream_sockets(lk: LiveKitServer, vf: NsVoicefleet) -> list[int]:
    """Destroy voicefleet's connections to LiveKit (`ss -K`: the peer gets a reset); return
    their local ports. LiveKit, its rooms and every other connection stay as they are."""
    listed = lk.ns.run(
        ["ss", "-tnpH", "state", "established", f"( dport = :{lk.port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    mine = re.compile(rf"127\.0\.0\.1:(\d+)\s+127\.0\.0\.1:{lk.port}\s.*pid={vf.proc.pid},")
    ports = [int(m.group(1)) for line in listed.splitlines() if (m := mine.search(line))]
    for port in ports:
        lk.ns.run(
            ["ss", "-K", "-tn", f"( sport = :{port} and dport = :{lk.port} )"],
            capture_output=True,
            check=True,
        )
    return ports


async def test_voicefleets_link_to_livekit_is_cut_mid_call_and_the_agent_stays_in_the_room(
    lk: LiveKitServer, vf: NsVoicefleet, start_worker: Callable[..., NsWorker], tmp_path: Path
) -> None:
    markers = tmp_path / "markers"
    worker = start_worker(ROOM_AGENT, "gw-cut", markers)
    await wait_for(worker.registered, 60, "room_agent to register with voicefleet")
    await registered_upstream(lk, "gw-cut")
    before = upstream_registrations(lk, "gw-cut")

    room = "gw-cut-call"
    await lk.call(
        lambda c: c.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(
                agent_name="gw-cut", room=room, metadata=json.dumps({"timeout": 120})
            )
        )
    )

    def joined() -> dict[str, Any] | None:
        return next((m for m in markers_of(markers, "joined") if m["room"] == room), None)

    agent = await wait_for(joined, 60, "the agent to join the LiveKit room")
    await job_state(vf, agent["job_id"], "running")

    reported = vf.log().count("reported running jobs to LiveKit")
    assert kill_upstream_sockets(lk, vf), "voicefleet has no connection to LiveKit to cut"
    await registered_upstream(lk, "gw-cut", before + 1)
    await wait_for(
        lambda: (
            vf.log().count("reported running jobs to LiveKit") > reported
            and any(
                "reported running jobs to LiveKit" in line and agent["job_id"] in line
                for line in vf.log().splitlines()
            )
        ),
        30,
        "voicefleet to report the call to LiveKit after registering again",
    )

    # The call goes on: the agent is still in LiveKit's room and its job still runs here.
    listed = await lk.call(
        lambda c: c.room.list_participants(api.ListParticipantsRequest(room=room))
    )
    assert agent["identity"] in {p.identity for p in listed.participants}
    assert (await vf.job(agent["job_id"]) or {}).get("state") == "running"
    assert not (markers / f"{agent['job_id']}.done").exists()

    await lk.call(lambda c: c.room.delete_room(api.DeleteRoomRequest(room=room)))
    await wait_for(lambda: (markers / f"{agent['job_id']}.done").exists(), 30, "the call to end")
    assert (markers / f"{agent['job_id']}.done").read_text() in ("disconnected", "cancelled")


async def test_livekit_goes_away_mid_call_the_call_ends_normally_and_voicefleet_registers_again(
    lk: LiveKitServer, vf: NsVoicefleet, start_worker: Callable[..., NsWorker], tmp_path: Path
) -> None:
    """Runs last in this module: it stops and restarts the module's LiveKit server."""
    markers = tmp_path / "markers"
    worker = start_worker(MARKER_AGENT, "gw-drop", markers)
    worker_id = await wait_for(worker.registered, 60, "marker_agent to register with voicefleet")
    await registered_upstream(lk, "gw-drop")
    before = upstream_registrations(lk, "gw-drop")

    dispatch = await lk.call(
        lambda c: c.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(
                agent_name="gw-drop", room="gw-drop-call", metadata='{"until_released": true}'
            )
        )
    )

    def started(dispatch_id: str) -> dict[str, Any] | None:
        return next(
            (m for m in markers_of(markers, "started") if m["dispatch_id"] == dispatch_id), None
        )

    call = await wait_for(lambda: started(dispatch.id), 30, "the call to start")
    await job_state(vf, call["job_id"], "running")

    # livekit-server stops: voicefleet's link to it drops, and it keeps retrying.
    lost = "not registered with LiveKit as agent 'gw-drop'"
    await asyncio.to_thread(lk.stop)
    await wait_for(lambda: vf.log().count(lost) >= 2, 30, "voicefleet to retry, in vain")

    # The call is not cut, and ends as its caller says while LiveKit is away; the worker's
    # last job updates, which cannot reach LiveKit now, disturb nothing here.
    assert (await vf.job(call["job_id"]) or {}).get("state") == "running"
    assert not (markers / f"{call['job_id']}.done").exists()
    (markers / f"{call['job_id']}.release").write_text("release")
    ended = await job_state(vf, call["job_id"], "succeeded", "failed")
    if ended["state"] == "failed":
        assert ended["error"] == NO_REASON, ended
    assert (markers / f"{call['job_id']}.done").read_text() == "done"
    assert worker.proc.poll() is None

    # LiveKit is back: voicefleet registers again, and LiveKit's jobs reach its worker again.
    await asyncio.to_thread(lk.start)
    await registered_upstream(lk, "gw-drop", before + 1)
    second = await lk.call(
        lambda c: c.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(agent_name="gw-drop", room="gw-drop-next")
        )
    )
    job = await wait_for(lambda: started(second.id), 30, "a job dispatched after the outage")
    # On the same connection of the same worker: nothing here broke meanwhile.
    assert (await job_state(vf, job["job_id"], "succeeded", "failed"))["worker_id"] == worker_id
    assert "Traceback" not in vf.log()
