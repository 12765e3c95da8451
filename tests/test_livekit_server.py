"""The real-LiveKit test rig itself: livekit-server (built by scripts/peers) in a network namespace
of the test's own, real livekit-agents workers registered directly with it, dispatches through its
own AgentDispatchService, and agents that join rooms and exchange audio through it.

No voicefleet in the path yet: these prove the rig that gateway-mode tests and benchmarks use.
Skipped, saying why, only when livekit-server is not built and cannot be built here."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from livekit import api

from tests.livekit import (
    BinaryUnavailable,
    LiveKitServer,
    Netns,
    NsWorker,
    livekit_server,
    server_binary,
    server_built,
)
from tests.support import MARKER_AGENT, wait_for

ROOM_AGENT = Path(__file__).parent / "agents" / "room_agent.py"

# A first run builds livekit-server (minutes); once it is there, the usual limit.
pytestmark = pytest.mark.timeout(120 if server_built() else 1800)


@pytest.fixture(scope="module")
def lk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveKitServer]:
    try:
        binary = server_binary()
    except BinaryUnavailable as e:
        print(f"livekit-server unavailable: {e}", file=sys.stderr)
        pytest.skip(f"livekit-server is not built and cannot be built here: {e}")
    with livekit_server(tmp_path_factory.mktemp("livekit"), binary=binary) as server:
        print(f"livekit-server {binary} in {server.ns.name}: log {server.log_path}")
        yield server


@pytest.fixture
def start_worker(
    lk: LiveKitServer, tmp_path: Path
) -> Iterator[Callable[[Path, str, Path], NsWorker]]:
    """Start a real livekit-agents worker inside the server's namespace; killed after."""
    workers: list[NsWorker] = []

    def start(script: Path, agent_name: str, markers: Path) -> NsWorker:
        env = {"MARKER_DIR": str(markers), "AGENT_NAME": agent_name}
        markers.mkdir(parents=True, exist_ok=True)
        worker = NsWorker(lk, script, tmp_path / f"worker-{agent_name}.log", env)
        print(f"worker {script.name} ({agent_name}): log {worker.log_path}, markers {markers}")
        print(f"livekit-server log: {lk.log_path}")
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


def markers_of(folder: Path, suffix: str) -> list[dict[str, Any]]:
    found = []
    for path in sorted(folder.glob(f"*.{suffix}")):
        try:
            found.append(json.loads(path.read_text()))
        except ValueError:
            continue  # still being written
    return found


def test_namespace_is_private_and_ends_with_everything_in_it() -> None:
    """Inside: lo and the veth pair, IPv4 only, no route out. A failing block still ends the
    processes in it, and the namespace with them."""

    def ip(ns: Netns, *args: str) -> list[str]:
        out: str = ns.run(["ip", "-o", *args], capture_output=True, text=True, check=True).stdout
        return out.splitlines()

    with pytest.raises(RuntimeError, match="the test failed"):
        with Netns() as ns:
            names = sorted(line.split(":")[1].strip().split("@")[0] for line in ip(ns, "link"))
            assert names == ["lo", "vf0", "vf1"]
            addrs = sorted(line.split()[3] for line in ip(ns, "addr"))
            assert addrs == ["10.203.0.1/24", "127.0.0.1/8"]  # no IPv6
            assert [line.split()[0] for line in ip(ns, "route")] == ["10.203.0.0/24"]
            child = ns.popen(["sleep", "300"], start_new_session=True)
            assert child.pid in ns.pids()
            path = ns.path
            raise RuntimeError("the test failed")
    assert child.wait(5) == -signal.SIGTERM
    assert not Path(path).exists()  # the holder is gone, and the namespace with it


async def test_livekit_server_dispatches_to_a_worker_registered_with_it(
    lk: LiveKitServer, start_worker: Callable[[Path, str, Path], NsWorker], tmp_path: Path
) -> None:
    """marker_agent registers directly with livekit-server; an explicit dispatch through
    livekit-server's AgentDispatchService (the real livekit-api client, inside the namespace)
    reaches it, and the job's entrypoint runs with a token for that room from that server."""
    assert lk.proc is not None and lk.proc.pid in lk.ns.pids()
    markers = tmp_path / "markers"
    worker = start_worker(MARKER_AGENT, "rig-marker", markers)
    await wait_for(worker.registered, 60, "marker_agent to register with livekit-server")

    room = "rig-marker-room"
    dispatch = await lk.call(
        lambda c: c.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(agent_name="rig-marker", room=room, metadata="{}")
        )
    )
    assert dispatch.id and dispatch.room == room

    def started() -> dict[str, Any] | None:
        return next(
            (m for m in markers_of(markers, "started") if m["dispatch_id"] == dispatch.id), None
        )

    job = await wait_for(started, 30, "the dispatched job to start in the worker")
    assert job["room"] == room
    assert job["url"] == lk.ws_url
    claims = api.TokenVerifier(lk.api_key, lk.api_secret).verify(job["token"])
    assert claims.video is not None and claims.video.room == room and claims.video.room_join
    assert claims.video.agent
    assert (claims.identity or "").startswith("agent-")
    await wait_for(lambda: (markers / f"{job['job_id']}.done").exists(), 30, "the job to end")

    listed = await lk.call(lambda c: c.agent_dispatch.list_dispatch(room_name=room))
    assert dispatch.id in [d.id for d in listed]
    rooms = await lk.call(lambda c: c.room.list_rooms(api.ListRoomsRequest(names=[room])))
    assert [r.name for r in rooms.rooms] == [room]  # the dispatch made the room


async def test_two_agents_join_a_room_and_hear_each_other(
    lk: LiveKitServer, start_worker: Callable[[Path, str, Path], NsWorker], tmp_path: Path
) -> None:
    """Two dispatches of room_agent to one room: both jobs `ctx.connect()`, publish a tone and
    hear the other's tone through livekit-server: signalling, ICE (UDP only, between addresses of
    the namespace) and DTLS/SRTP all work inside it. Deleting the room ends both jobs."""
    markers = tmp_path / "markers"
    worker = start_worker(ROOM_AGENT, "rig-room", markers)
    await wait_for(worker.registered, 60, "room_agent to register with livekit-server")

    room = "rig-call"
    meta = json.dumps({"expect_audio_from": 1, "timeout": 90})

    async def until_in_room(n: int, timeout: float = 30) -> None:
        req = api.ListParticipantsRequest(room=room)
        deadline = time.monotonic() + timeout
        while len((await lk.call(lambda c: c.room.list_participants(req))).participants) < n:
            assert time.monotonic() < deadline, f"agent {n} did not join the room in {timeout}s"
            await asyncio.sleep(0.1)

    # One after the other: open-source livekit-server offers a job to a worker only while no
    # other offer to it is pending, and drops the job otherwise ("no workers with sufficient
    # capacity": it has no queue), so two dispatches at once to one worker lose one.
    for n in (1, 2):
        await lk.call(
            lambda c: c.agent_dispatch.create_dispatch(
                api.CreateAgentDispatchRequest(agent_name="rig-room", room=room, metadata=meta)
            )
        )
        await until_in_room(n)

    def both_joined() -> list[dict[str, Any]] | None:
        joined = markers_of(markers, "joined")
        return joined if len(joined) == 2 else None

    joined = await wait_for(both_joined, 60, "both agents to join and hear each other")
    identities = {m["identity"] for m in joined}
    assert len(identities) == 2
    for m in joined:
        assert m["room"] == room and m["url"] == lk.ws_url
        (other,) = identities - {m["identity"]}
        assert m["participants"] == [other]
        assert m["heard"][other]["frames"] >= 50 and m["heard"][other]["peak"] >= 2000, m["heard"]
        # One peer connection (livekit-agents' default) or two: check each that reports.
        pcs = [pc for pc in (m["publisher"], m["subscriber"]) if pc]
        assert pcs, m
        for pc in pcs:
            assert pc["dtls_state"] == "DTLS_TRANSPORT_CONNECTED", pc
            local, remote = pc["local"], pc["remote"]
            assert (local["protocol"], local["address"]) == ("udp", lk.ns.media_ip), pc
            assert local["candidateType"] == "HOST", pc
            assert (remote["protocol"], remote["port"]) == ("udp", lk.udp_port), pc
            # The server's own host candidate, or the same address learnt from its first
            # connectivity check when that beat the candidate's signalling (peer reflexive:
            # libwebrtc then leaves the address out of its stats). The server's log says which.
            assert (remote["candidateType"], remote["address"]) in (
                ("HOST", lk.node_ip),
                ("PRFLX", ""),
            ), pc
        assert sum(pc.get("rtp_packets_sent", 0) for pc in pcs) > 0, pcs
        assert sum(pc.get("rtp_packets_received", 0) for pc in pcs) > 0, pcs

    # The server's view of each agent's ICE (every pair it selected): its own host candidate
    # 127.0.0.1:7882 over UDP, and the agent's port on the namespace's veth address, as a host
    # candidate or learnt first from a check (prflx, a trickle ICE race); nothing else.
    local = re.compile(
        rf"\[local\]\[selected:\d+\]\S* udp4 host {re.escape(lk.node_ip)}:{lk.udp_port} "
    )
    remote = re.compile(
        rf"\[remote\]\[selected:\d+\]\S* udp (host|prflx) {re.escape(lk.ns.media_ip)}:\d+$"
    )
    active = {e["participant"]: e for e in lk.log_entries("participant active")}
    for identity in identities:
        selected = [c for c in active[identity]["publisherCandidates"] if "[selected" in c]
        assert any(local.match(c) for c in selected), selected
        assert any(remote.match(c) for c in selected), selected
        assert all(local.match(c) or remote.match(c) for c in selected), selected

    infos = await lk.call(
        lambda c: c.room.list_participants(api.ListParticipantsRequest(room=room))
    )
    assert {p.identity for p in infos.participants} == identities
    for p in infos.participants:
        assert [t.type for t in p.tracks] == [api.TrackType.AUDIO], p

    # The call ends from the server's side: both jobs see the room go and end.
    await lk.call(lambda c: c.room.delete_room(api.DeleteRoomRequest(room=room)))
    done = [markers / f"{m['job_id']}.done" for m in joined]
    await wait_for(lambda: all(p.exists() for p in done), 30, "both jobs to end")
    assert {p.read_text() for p in done} <= {"disconnected", "cancelled"}


def test_scripts_peers_path_is_instant_once_built() -> None:
    """`scripts/peers` with the binary present does nothing: it prints the path at once (with
    no peer named it builds every peer, each path a line; the last is not livekit-server's)."""
    try:
        binary = server_binary(build=False)
    except BinaryUnavailable as e:
        pytest.skip(f"livekit-server is not built here: {e}")
    root = Path(__file__).resolve().parent.parent
    for argv in (["build", "livekit-server"], ["path", "livekit-server"]):
        out = subprocess.run(
            [str(root / "scripts" / "peers"), *argv],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
            env={**os.environ, "PATH": "/usr/bin:/bin"},  # no Go needed once built
        )
        assert out.stdout.strip().splitlines()[-1] == str(binary)
        assert out.stderr == ""
