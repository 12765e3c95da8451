"""Gateway mode against the real livekit-server: `vf server --livekit-url … --livekit-api-key …
--livekit-api-secret …` registers with it as a worker, and real livekit-agents workers registered
with voicefleet (not with LiveKit) serve LiveKit's own dispatches.

Everything that talks to the LiveKit server (it, the `vf server`, the workers, the livekit-api
client) runs inside the rig's network namespace (tests/livekit.py). Skipped, saying why, only
when livekit-server is not built and cannot be built here."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import jwt
import pytest
from livekit import api
from livekit.protocol import agent as lkagent
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
from voicefleet.config import DispatchSettings, GatewaySettings, Project
from voicefleet.dispatch.registry import PoolKey, PoolLoad, Worker, pool_load
from voicefleet.dispatch.routing import RoutingTable
from voicefleet.dispatch.service import DispatchService
from voicefleet.gateway.target import LiveKitTarget, backoff
from voicefleet.gateway.upstream import COLD_START_LOAD, Upstream, upstream_status
from voicefleet.metrics import Metrics
from voicefleet.protocol import tokens

AGENTS = Path(__file__).parent / "agents"
ROOM_AGENT = AGENTS / "room_agent.py"
TYPED_AGENT = AGENTS / "typed_agent.py"
PARTICIPANT = AGENTS / "participant.py"

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

    def start(
        script: Path, agent_name: str, markers: Path, via: NsVoicefleet | None = None, **env: str
    ) -> NsWorker:
        """`via`: the voicefleet server it registers with (the module's by default)."""
        markers.mkdir(parents=True, exist_ok=True)
        log = tmp_path / f"worker-{agent_name or 'automatic'}-{len(workers)}.log"
        worker = NsWorker(
            lk,
            script,
            log,
            (via or vf).worker_env(MARKER_DIR=str(markers), AGENT_NAME=agent_name, **env),
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


def upstream_registrations(lk: LiveKitServer, agent_name: str, job_type: str = "") -> int:
    """How many times a worker registered with LiveKit for `agent_name` (LiveKit's own log),
    of `job_type` (e.g. "JT_PUBLISHER") if given."""
    return sum(
        1
        for e in lk.log_entries("worker registered")
        if e.get("agentName", "") == agent_name and (not job_type or e.get("jobType") == job_type)
    )


async def registered_upstream(
    lk: LiveKitServer, agent_name: str, times: int = 1, job_type: str = ""
) -> None:
    await wait_for(
        lambda: upstream_registrations(lk, agent_name, job_type) >= times,
        30,
        f"voicefleet to register with LiveKit for {agent_name!r} {job_type} ({times}x)",
    )


def gateway_workers(lk: LiveKitServer, agent_name: str) -> set[str]:
    """LiveKit's ids of the registrations for `agent_name` (voicefleet's, in these tests)."""
    return {
        e["workerID"]
        for e in lk.log_entries("worker registered")
        if e.get("agentName", "") == agent_name
    }


def participant_token(
    lk: LiveKitServer, room: str, identity: str, agents: list[api.RoomAgentDispatch]
) -> str:
    """A caller's token, as a backend mints it: the room's agents in its RoomConfiguration."""
    return (
        api.AccessToken(lk.api_key, lk.api_secret)
        .with_identity(identity)
        .with_grants(api.VideoGrants(room_join=True, room=room))
        .with_room_config(api.RoomConfiguration(agents=agents))
        .to_jwt()
    )


class Participant:
    """tests/agents/participant.py inside the namespace: a caller in a LiveKit room, until
    `leave()` (which closes its stdin; killed by pid if it does not go)."""

    def __init__(self, lk: LiveKitServer, token: str, log_path: Path, publish: bool = False):
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = lk.ns.popen(
                [sys.executable, str(PARTICIPANT)],
                env={
                    **os.environ,
                    "LIVEKIT_URL": lk.ws_url,
                    "PARTICIPANT_TOKEN": token,
                    "PUBLISH": "1" if publish else "",
                },
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def said(self, event: str) -> bool:
        text = self.log_path.read_text(errors="replace")
        if self.proc.poll() is not None:
            raise AssertionError(f"participant exited ({self.proc.returncode}):\n{text}")
        return f'"event": "{event}"' in text

    def leave(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def join(lk: LiveKitServer, tmp_path: Path) -> Iterator[Callable[..., Participant]]:
    """Callers in LiveKit rooms; each leaves after the test."""
    joined: list[Participant] = []

    def start(token: str, publish: bool = False) -> Participant:
        participant = Participant(lk, token, tmp_path / f"participant-{len(joined)}.log", publish)
        joined.append(participant)
        return participant

    yield start
    for participant in joined:
        participant.leave()


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


def test_a_pool_is_full_upstream_only_when_no_worker_is_free_and_none_can_be_started() -> None:
    available, full = lkagent.WorkerStatus.WS_AVAILABLE, lkagent.WorkerStatus.WS_FULL
    free = PoolLoad(load=0.25, available=True, jobs=1)
    busy = PoolLoad(load=1.0, available=False, jobs=8)
    empty = pool_load([])
    assert upstream_status(free, can_start=False) == (available, 0.25)
    assert upstream_status(free, can_start=True) == (available, 0.25)  # its real load
    assert upstream_status(busy, can_start=False) == (full, 1.0)
    assert upstream_status(empty, can_start=False) == (full, 1.0)
    # An instance can be started (scale up, or from zero): LiveKit must go on offering jobs,
    # so that they queue here and wake the autoscaler. It never picks a worker at load 1, and
    # should prefer a voicefleet server with a free worker to a cold start.
    assert upstream_status(busy, can_start=True) == (available, COLD_START_LOAD)
    assert upstream_status(empty, can_start=True) == (available, COLD_START_LOAD)
    assert 0.5 < COLD_START_LOAD < 1


async def test_go_away_from_livekit_ends_that_connection_and_it_takes_no_new_job() -> None:
    """LiveKit's open-source server never sends go_away (LiveKit Cloud's drain does): the frame
    is handled here as it would arrive, and the connection is left for a new one."""
    service = DispatchService(Project("test", "key", "secret"), DispatchSettings(), Metrics())
    upstream = Upstream(
        PoolKey("gw", "", lkagent.JobType.JT_ROOM),
        models.ParticipantPermission(),
        LiveKitTarget("ws://127.0.0.1:9", "key", "secret"),
        service,
        GatewaySettings(),
    )
    sent: asyncio.Queue[bytes] = asyncio.Queue()
    upstream._outbox = sent  # what goes to LiveKit on the current connection

    def frame(msg: lkagent.ServerMessage) -> bytes:
        return msg.SerializeToString()

    go_away = lkagent.ServerMessage(go_away=lkagent.AgentHttp.GoAway(reason="draining"))
    assert upstream._handle(frame(go_away))  # the connection is to end
    assert not upstream._handle(frame(go_away))  # once
    offer = lkagent.Job(id="AJ_late", agent_name="gw", room=models.Room(name="r", sid="RM_r"))
    upstream._handle(frame(lkagent.ServerMessage(availability={"job": offer})))
    answer = lkagent.WorkerMessage.FromString(sent.get_nowait()).availability
    assert answer.job_id == "AJ_late" and not answer.available and not answer.terminate
    assert service.queued_by_agent() == {}  # not taken here: LiveKit offers it elsewhere


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


async def create_room(client: api.LiveKitAPI, name: str) -> models.Room:
    return await client.room.create_room(api.CreateRoomRequest(name=name))


async def delete_room(client: api.LiveKitAPI, name: str) -> api.DeleteRoomResponse:
    return await client.room.delete_room(api.DeleteRoomRequest(room=name))


def started_in(folder: Path, room: str) -> dict[str, Any] | None:
    return next((m for m in markers_of(folder, "started") if m["room"] == room), None)


UNTIL_RELEASED = json.dumps({"until_released": True})


async def test_a_caller_whose_token_names_an_agent_gets_a_voicefleet_worker_in_its_room(
    lk: LiveKitServer,
    vf: NsVoicefleet,
    start_worker: Callable[..., NsWorker],
    join: Callable[..., Participant],
    tmp_path: Path,
) -> None:
    markers = tmp_path / "markers"
    worker = start_worker(MARKER_AGENT, "gw-token", markers)
    worker_id = await wait_for(worker.registered, 60, "marker_agent to register with voicefleet")
    await registered_upstream(lk, "gw-token")

    # The caller's backend names the agent in the token; the room does not exist yet: LiveKit
    # makes it with the token's RoomConfiguration when the caller joins.
    room = "gw-token-room"
    dispatched = api.RoomAgentDispatch(agent_name="gw-token", metadata=UNTIL_RELEASED)
    caller = join(participant_token(lk, room, "caller-token", [dispatched]))
    await wait_for(lambda: caller.said("joined"), 60, "the caller to join LiveKit's room")

    job = await wait_for(lambda: started_in(markers, room), 30, "the token's agent job to start")
    assert job["url"] == lk.ws_url and job["metadata"] == UNTIL_RELEASED
    # LiveKit's dispatch, made from the token, is the one voicefleet's job belongs to.
    [dispatch] = await lk.call(lambda c: c.agent_dispatch.list_dispatch(room_name=room))
    assert dispatch.agent_name == "gw-token" and dispatch.id == job["dispatch_id"]
    running = await job_state(vf, job["job_id"], "running")
    assert running["worker_id"] == worker_id and running["room"] == room
    [assigned] = [e for e in lk.log_entries("assigned job to worker") if e["room"] == room]
    assert assigned["jobID"] == job["job_id"]
    assert assigned["workerID"] in gateway_workers(lk, "gw-token")

    (markers / f"{job['job_id']}.release").write_text("release")
    await job_state(vf, job["job_id"], "succeeded", "failed")
    caller.leave()
    await lk.call(lambda c: c.room.delete_room(api.DeleteRoomRequest(room=room)))


async def test_automatic_dispatch_gives_every_new_room_a_worker_of_voicefleet(
    lk: LiveKitServer, start_worker: Callable[..., NsWorker], tmp_path: Path
) -> None:
    """A voicefleet server of its own: while a worker without an agent name is registered
    through it, every room made on the LiveKit server gets a job, other tests' rooms too."""
    own = NsVoicefleet(lk, tmp_path / "vf-automatic", log_level="debug")
    rooms = ["gw-auto-1", "gw-auto-2"]
    try:
        await asyncio.to_thread(own.started)
        markers = tmp_path / "markers"
        worker = start_worker(MARKER_AGENT, "", markers, via=own)
        worker_id = await wait_for(worker.registered, 60, "an automatic worker to register")
        await registered_upstream(lk, "")

        for room in rooms:
            await lk.call(partial(create_room, name=room))
            job = await wait_for(
                partial(started_in, markers, room), 30, f"a job for the new room {room}"
            )
            assert job["url"] == lk.ws_url
            ended = await job_state(own, job["job_id"], "succeeded", "failed")
            assert ended["worker_id"] == worker_id and ended["agent_name"] == ""
            [assigned] = [e for e in lk.log_entries("assigned job to worker") if e["room"] == room]
            assert assigned["jobID"] == job["job_id"]
            assert assigned["workerID"] in gateway_workers(lk, "")
    finally:
        await asyncio.to_thread(own.stop)  # its registration, automatic dispatch with it, ends
        for room in rooms:
            await lk.call(partial(delete_room, name=room))


async def test_publisher_and_participant_jobs_reach_voicefleet_workers_of_those_job_types(
    lk: LiveKitServer,
    vf: NsVoicefleet,
    start_worker: Callable[..., NsWorker],
    join: Callable[..., Participant],
    tmp_path: Path,
) -> None:
    kinds = {"PUBLISHER": "gw-publisher", "PARTICIPANT": "gw-participant"}
    markers = {kind: tmp_path / kind for kind in kinds}
    workers = {
        kind: start_worker(TYPED_AGENT, agent_name, markers[kind], WORKER_TYPE=kind)
        for kind, agent_name in kinds.items()
    }
    for kind, agent_name in kinds.items():
        await wait_for(workers[kind].registered, 60, f"a {kind} worker to register with voicefleet")
        # voicefleet registers with LiveKit for the job type its workers declare.
        await registered_upstream(lk, agent_name, job_type=f"JT_{kind}")

    # A participant job starts when the caller joins, a publisher job when it publishes.
    room = "gw-typed"
    agents = [api.RoomAgentDispatch(agent_name=n, metadata=UNTIL_RELEASED) for n in kinds.values()]
    caller = join(participant_token(lk, room, "caller-typed", agents), publish=True)
    await wait_for(lambda: caller.said("published"), 60, "the caller to join and publish")

    for kind, agent_name in kinds.items():

        def typed(folder: Path = markers[kind]) -> dict[str, Any] | None:
            return next((m for m in markers_of(folder, "typed") if m["room"] == room), None)

        job = await wait_for(typed, 30, f"the {kind} job to start on voicefleet's worker")
        assert job["type"] == f"JT_{kind}" and job["participant"] == "caller-typed"
        running = await job_state(vf, job["job_id"], "running")
        assert running["agent_name"] == agent_name and running["room"] == room
        [assigned] = [
            e for e in lk.log_entries("assigned job to worker") if e["jobID"] == job["job_id"]
        ]
        assert assigned["workerID"] in gateway_workers(lk, agent_name)
        (markers[kind] / f"{job['job_id']}.release").write_text("release")
        await job_state(vf, job["job_id"], "succeeded", "failed")
    caller.leave()
    await lk.call(lambda c: c.room.delete_room(api.DeleteRoomRequest(room=room)))


async def test_two_voicefleet_servers_serve_one_agent_and_one_leaving_cuts_none_of_the_others_calls(
    lk: LiveKitServer, vf: NsVoicefleet, start_worker: Callable[..., NsWorker], tmp_path: Path
) -> None:
    agent_name = "gw-multi"
    other = NsVoicefleet(lk, tmp_path / "vf-other", log_level="debug")
    try:
        await asyncio.to_thread(other.started)
        servers = {"vf": vf, "other": other}
        markers = {name: tmp_path / name for name in servers}
        workers = {
            name: start_worker(MARKER_AGENT, agent_name, markers[name], via=server)
            for name, server in servers.items()
        }
        for name, worker in workers.items():
            await wait_for(worker.registered, 60, f"the worker of {name} to register")
        await registered_upstream(lk, agent_name, 2)

        # LiveKit spreads its jobs over both registrations (weighted by the load each reports).
        calls: dict[str, list[str]] = {name: [] for name in servers}
        for n in range(30):
            request = api.CreateAgentDispatchRequest(
                agent_name=agent_name, room=f"gw-multi-{n}", metadata=UNTIL_RELEASED
            )
            dispatch = await lk.call(partial(dispatch_with, request=request))

            def landed(dispatch_id: str = dispatch.id) -> tuple[str, str] | None:
                for name, folder in markers.items():
                    for m in markers_of(folder, "started"):
                        if m["dispatch_id"] == dispatch_id:
                            return name, str(m["job_id"])
                return None

            name, job_id = await wait_for(landed, 30, f"the job of {dispatch.id} to start")
            calls[name].append(job_id)
            if all(calls.values()):
                break
        assert all(calls.values()), calls
        assigned = {e["jobID"]: e["workerID"] for e in lk.log_entries("assigned job to worker")}
        by = {name: {assigned[j] for j in jobs} for name, jobs in calls.items()}
        assert len(by["vf"]) == len(by["other"]) == 1 and by["vf"] != by["other"], by
        for name, jobs in calls.items():
            for job_id in jobs:
                assert (await job_state(servers[name], job_id, "running"))[
                    "agent_name"
                ] == agent_name

        # The other server stops: LiveKit drops its registration; vf's calls are not touched,
        # and LiveKit's next job goes to vf.
        await asyncio.to_thread(other.stop)
        await wait_for(
            lambda: any(e["workerID"] in by["other"] for e in lk.log_entries("closing worker")),
            30,
            "LiveKit to close the stopped server's registration",
        )
        for job_id in calls["vf"]:
            assert (await vf.job(job_id) or {}).get("state") == "running"
            assert not (markers["vf"] / f"{job_id}.done").exists()
        request = api.CreateAgentDispatchRequest(agent_name=agent_name, room="gw-multi-after")
        after = await lk.call(partial(dispatch_with, request=request))
        job = await wait_for(
            lambda: next(
                (m for m in markers_of(markers["vf"], "started") if m["dispatch_id"] == after.id),
                None,
            ),
            30,
            "the next job to reach the server still there",
        )
        await job_state(vf, job["job_id"], "succeeded", "failed")
        for job_id in calls["vf"]:
            (markers["vf"] / f"{job_id}.release").write_text("release")
            await job_state(vf, job_id, "succeeded", "failed")
            assert (markers["vf"] / f"{job_id}.done").read_text() == "done"
    finally:
        await asyncio.to_thread(other.stop)


async def test_voicefleet_restarts_mid_call_registers_again_and_the_call_goes_on(
    lk: LiveKitServer, start_worker: Callable[..., NsWorker], tmp_path: Path
) -> None:
    data = tmp_path / "vf-restart"
    port = 7979  # fixed: the worker comes back to the same address
    own = await asyncio.to_thread(NsVoicefleet(lk, data, log_level="debug", port=port).started)
    try:
        markers = tmp_path / "markers"
        worker = start_worker(ROOM_AGENT, "gw-restart", markers, via=own)
        await wait_for(worker.registered, 60, "room_agent to register with voicefleet")
        await registered_upstream(lk, "gw-restart")

        room = "gw-restart-call"
        await lk.call(
            lambda c: c.agent_dispatch.create_dispatch(
                api.CreateAgentDispatchRequest(
                    agent_name="gw-restart", room=room, metadata=json.dumps({"timeout": 120})
                )
            )
        )

        def joined() -> dict[str, Any] | None:
            return next((m for m in markers_of(markers, "joined") if m["room"] == room), None)

        agent = await wait_for(joined, 60, "the agent to join the LiveKit room")
        await job_state(own, agent["job_id"], "running")

        # voicefleet stops and starts again on the same data dir, mid-call.
        await asyncio.to_thread(own.stop)
        own = await asyncio.to_thread(NsVoicefleet(lk, data, log_level="debug", port=port).started)
        await wait_for(
            lambda: worker.log().count('"message": "registered worker"') >= 2,
            60,
            "the worker to register again with the restarted voicefleet",
        )
        await registered_upstream(lk, "gw-restart", 2)
        await wait_for(
            lambda: any(
                "job re-adopted" in line and agent["job_id"] in line
                for line in own.log().splitlines()
            ),
            60,
            "the restarted voicefleet to take the running call back from its worker",
        )

        # The call went on throughout: the agent is in LiveKit's room, its job runs here.
        listed = await lk.call(
            lambda c: c.room.list_participants(api.ListParticipantsRequest(room=room))
        )
        assert agent["identity"] in {p.identity for p in listed.participants}
        assert (await own.job(agent["job_id"]) or {}).get("state") == "running"
        assert not (markers / f"{agent['job_id']}.done").exists()

        await lk.call(lambda c: c.room.delete_room(api.DeleteRoomRequest(room=room)))
        await wait_for(lambda: (markers / f"{agent['job_id']}.done").exists(), 30, "the end")
        assert (markers / f"{agent['job_id']}.done").read_text() in ("disconnected", "cancelled")
        await job_state(own, agent["job_id"], "succeeded", "failed", "terminated")
    finally:
        await asyncio.to_thread(own.stop)


async def test_a_worker_that_rejects_a_job_for_good_ends_it_on_livekit_too(
    lk: LiveKitServer, vf: NsVoicefleet, start_worker: Callable[..., NsWorker], tmp_path: Path
) -> None:
    markers = tmp_path / "markers"
    worker = start_worker(MARKER_AGENT, "gw-reject", markers, REJECT_JOBS="terminate")
    await wait_for(worker.registered, 60, "marker_agent to register with voicefleet")
    await registered_upstream(lk, "gw-reject")

    room = "gw-reject-room"
    dispatch = await lk.call(
        lambda c: c.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(agent_name="gw-reject", room=room)
        )
    )

    # The worker's `terminate` reaches LiveKit, which records the job as done and offers it to
    # no other worker. ("Not available" would leave LiveKit's dispatch with no job at all.)
    async def recorded() -> lkagent.Job | None:
        listed = await lk.call(lambda c: c.agent_dispatch.list_dispatch(room_name=room))
        jobs = [j for d in listed if d.id == dispatch.id for j in d.state.jobs]
        return jobs[0] if jobs else None

    job: lkagent.Job = await wait_for(
        recorded, 30, "LiveKit to record the dispatch's job", interval=0.2
    )
    assert job.state.status == lkagent.JobStatus.JS_SUCCESS, job
    ended = await job_state(vf, job.id, "terminated")
    assert "ended the job" in ended["error"], ended
    assert not markers_of(markers, "started")
    assert not [
        e for e in lk.log_entries("failed to assign job to worker") if e.get("jobID") == job.id
    ]
    await lk.call(lambda c: c.room.delete_room(api.DeleteRoomRequest(room=room)))


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
