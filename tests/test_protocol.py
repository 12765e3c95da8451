"""The worker endpoint against hand-written peers: tokens, frames, silence, unanswered offers."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import Callable

import aiohttp
import httpx
import jwt
import pytest
from livekit import api
from livekit.protocol import agent
from livekit.protocol.agent_dispatch import JobRestartPolicy

from tests.peers import Peer, worker_jwt
from tests.support import DEV_KEY, DEV_SECRET, Server, admin_token, wait_for
from voicefleet.protocol import tokens


def upgrade(server: Server, authorization: str | None) -> httpx.Response:
    headers = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
    }
    if authorization is not None:
        headers["Authorization"] = authorization
    return httpx.get(server.url + "/agent", headers=headers)


def signed(claims: dict[str, object], secret: str = DEV_SECRET) -> str:
    return jwt.encode(claims, secret, algorithm="HS256")


NOW = int(time.time())
BAD_TOKENS = {
    "missing": (None, 401, "missing Authorization header"),
    "garbage": ("Bearer not.a.jwt", 401, "malformed access token"),
    "expired": (
        "Bearer " + signed({"iss": DEV_KEY, "exp": NOW - 3600, "video": {"agent": True}}),
        401,
        "expired",
    ),
    "not yet valid": (
        "Bearer "
        + signed({"iss": DEV_KEY, "nbf": NOW + 3600, "exp": NOW + 7200, "video": {"agent": True}}),
        401,
        "not valid yet",
    ),
    "wrong secret": ("Bearer " + worker_jwt(secret="not-the-secret"), 401, "signature does not"),
    "unknown key": ("Bearer " + worker_jwt(key="nobody"), 401, "unknown API key 'nobody'"),
    "no agent grant": (
        "Bearer " + tokens.mint(DEV_KEY, DEV_SECRET, video={"roomJoin": True}),
        403,
        "lacks the 'agent' grant",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
def test_bad_worker_tokens_are_rejected_before_the_upgrade_with_a_reason(
    server: Server, case: str
) -> None:
    authorization, status, reason = BAD_TOKENS[case]
    r = upgrade(server, authorization)
    assert r.status_code == status
    assert reason in r.text


async def test_worker_token_tags_the_worker_and_a_bad_one_is_refused(server: Server) -> None:
    identity = tokens.WorkerIdentity(agent="CA_tagged", version="v7", instance="tagged-v7-1")
    peer = await Peer.connect(
        server.ws_url,
        "tagged",
        params={"worker_token": tokens.mint_worker_token(DEV_SECRET, identity)},
        deployment="staging",
    )
    try:
        [w] = server.workers("tagged")
        assert (w["pool"], w["agent_id"], w["instance"]) == ("v7", "CA_tagged", "tagged-v7-1")
        assert w["deployment"] == "staging"
    finally:
        await peer.close()
    with pytest.raises(aiohttp.WSServerHandshakeError) as denied:
        await Peer.connect(server.ws_url, "tagged", params={"worker_token": "forged"})
    assert denied.value.status == 401


async def test_instance_key_names_the_worker_and_cannot_drive_the_control_api(
    server: Server,
) -> None:
    identity = tokens.WorkerIdentity(agent="CA_keyed", version="v3", instance="keyed-v3-1")
    key, secret = tokens.instance_credentials(DEV_SECRET, identity)
    peer = await Peer.connect(server.ws_url, "keyed", token=worker_jwt(key, secret))
    try:
        [w] = server.workers("keyed")
        assert (w["pool"], w["agent_id"], w["instance"]) == ("v3", "CA_keyed", "keyed-v3-1")
    finally:
        await peer.close()
    forged = worker_jwt(key, "not-derived-from-the-project-secret")
    assert upgrade(server, f"Bearer {forged}").status_code == 401
    admin = tokens.mint_admin(key, secret)
    r = httpx.get(server.url + "/api/v1/agents", headers={"Authorization": f"Bearer {admin}"})
    assert r.status_code == 403 and "project's key" in r.text


async def _closed_with(peer: Peer) -> int | None:
    await wait_for(peer.closed.is_set, 10, "the server to close the connection")
    return peer.ws.close_code


@pytest.mark.parametrize(
    "frame", [b"\xff\x00garbage", "a text frame", agent.WorkerMessage().SerializeToString()]
)
async def test_malformed_frames_close_that_connection_only(
    server: Server, frame: bytes | str
) -> None:
    good = await Peer.connect(server.ws_url, "frames")
    bad = await Peer.connect(server.ws_url, "frames")
    try:
        if isinstance(frame, str):
            await bad.ws.send_str(frame)
        else:
            await bad.ws.send_bytes(frame)
        assert await _closed_with(bad) == 1007
        await wait_for(lambda: len(server.workers("frames")) == 1, 10, "the bad peer's removal")

        lk = api.LiveKitAPI(server.url, DEV_KEY, DEV_SECRET)
        try:
            d = await lk.agent_dispatch.create_dispatch(
                api.CreateAgentDispatchRequest(agent_name="frames", room=f"frames-{os.getpid()}")
            )
        finally:
            await lk.aclose()
        job = await wait_for(lambda: server.job(d.state.jobs[0].id), 10, "the job")
        await wait_for(lambda: good.assignments, 10, "the good peer to get the job")
        assert job["worker_id"] in ("", good.worker_id)
    finally:
        await good.close()
        await bad.close()


async def test_first_message_must_be_register(server: Server) -> None:
    peer = await Peer.connect(server.ws_url, "unregistered", register=False)
    try:
        await peer.send(agent.WorkerMessage(ping=agent.WorkerPing(timestamp=1)))
        assert await _closed_with(peer) == 1007
    finally:
        await peer.close()


async def test_protocol_ping_gets_a_pong_echoing_its_timestamp(server: Server) -> None:
    peer = await Peer.connect(server.ws_url, "pinger")
    try:
        await peer.send(agent.WorkerMessage(ping=agent.WorkerPing(timestamp=123456)))
        [pong] = await wait_for(lambda: peer.pongs, 10, "a pong")
        assert pong.last_timestamp == 123456 and pong.timestamp > 0
    finally:
        await peer.close()


async def dispatch(
    server: Server,
    agent_name: str,
    room: str,
    restart_policy: int = JobRestartPolicy.JRP_ON_FAILURE,
) -> str:
    lk = api.LiveKitAPI(server.url, DEV_KEY, DEV_SECRET)
    try:
        d = await lk.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(
                agent_name=agent_name,
                room=room,
                restart_policy=restart_policy,  # type: ignore[arg-type]
            )
        )
    finally:
        await lk.aclose()
    return d.state.jobs[0].id


async def test_job_of_a_worker_that_sends_garbage_fails_with_the_reason(server: Server) -> None:
    peer = await Peer.connect(server.ws_url, "garbler")
    peer.end_jobs = False
    try:
        job_id = await dispatch(server, "garbler", "garbled-call", JobRestartPolicy.JRP_NEVER)
        await wait_for(lambda: peer.assignments, 10, "the assignment")
        await peer.ws.send_bytes(b"\x08\xff\xff")
        job = await wait_for(
            lambda: (j := server.job(job_id)) and j["state"] == "failed" and j, 10, "the failure"
        )
        assert peer.worker_id in job["error"] and "protocol error" in job["error"]
    finally:
        await peer.close()


async def test_peer_that_never_answers_an_offer_loses_the_job_to_the_next_after_the_timeout(
    start_server: Callable[..., Server],
) -> None:
    server = start_server("--availability-timeout", "1")
    mute = await Peer.connect(server.ws_url, "mute")
    mute.answer = "ignore"
    taker = await Peer.connect(server.ws_url, "mute")
    try:
        jobs = [await dispatch(server, "mute", f"mute-{i}") for i in range(2)]
        for job_id in jobs:
            job = await wait_for(
                lambda j=job_id: (x := server.job(j)) and x["state"] == "succeeded" and x,
                10,
                f"{job_id} to succeed on the answering peer",
            )
            assert job["worker_id"] == taker.worker_id
        assert mute.offers  # it was asked, and did not answer
        assert server.metric("voicefleet_offers_total", outcome="timeout") >= 1
        slow = [j for j in map(server.job, jobs) if j and j["assigned_at"] - j["created_at"] >= 1]
        assert slow, "the job offered to the mute peer waited for the timeout"
    finally:
        await mute.close()
        await taker.close()


async def test_job_accepted_but_never_started_goes_to_the_next_worker_and_a_late_start_is_stopped(
    start_server: Callable[..., Server],
) -> None:
    # livekit-agents drops an assignment that comes 7.5 s after it accepted, and says nothing.
    server = start_server("--start-timeout", "1")
    dropper = await Peer.connect(server.ws_url, "dropper")
    dropper.start_jobs = False
    try:
        job_id = await dispatch(server, "dropper", "dropped-call")
        await wait_for(lambda: dropper.assignments, 10, "the assignment")
        assert server.job(job_id)["state"] == "assigned"  # type: ignore[index]
        taker = await Peer.connect(server.ws_url, "dropper")
        try:
            job = await wait_for(
                lambda: (j := server.job(job_id)) and j["state"] == "succeeded" and j,
                10,
                "the job to run on the next worker",
            )
            assert job["worker_id"] == taker.worker_id and [
                a.job.id for a in taker.assignments
            ] == [job_id]
            assert server.metric("voicefleet_offers_total", outcome="not_started") == 1
            # The first worker starts it after all: it is told to stop; the job stays the taker's.
            assert dropper.terminations == []
            await dropper.update(job_id, agent.JobStatus.JS_RUNNING)
            await wait_for(lambda: dropper.terminations == [job_id], 10, "a termination")
            assert server.job(job_id)["worker_id"] == taker.worker_id  # type: ignore[index]
        finally:
            await taker.close()
    finally:
        await dropper.close()


async def test_a_worker_that_starts_a_job_late_keeps_it_if_nobody_else_took_it(
    start_server: Callable[..., Server],
) -> None:
    server = start_server("--start-timeout", "1")
    slow = await Peer.connect(server.ws_url, "slowpoke")
    slow.start_jobs = False
    try:
        job_id = await dispatch(server, "slowpoke", "slow-call")
        await wait_for(
            lambda: server.metric("voicefleet_offers_total", outcome="not_started") == 1,
            10,
            "the start timeout",
        )
        assert server.job(job_id)["state"] == "pending"  # type: ignore[index]
        await asyncio.sleep(1)  # refused jobs are offered again every 0.25 s: not to this one
        await slow.update(job_id, agent.JobStatus.JS_RUNNING)  # starting took a while
        job = await wait_for(
            lambda: (j := server.job(job_id)) and j["state"] == "running" and j, 10, "running"
        )
        assert job["worker_id"] == slow.worker_id and slow.terminations == []
        await slow.update(job_id, agent.JobStatus.JS_SUCCESS)
        await wait_for(
            lambda: (j := server.job(job_id)) and j["state"] == "succeeded", 10, "the end"
        )
        assert len(slow.offers) == 1  # it was not offered the job again meanwhile
    finally:
        await slow.close()


async def test_a_job_never_goes_back_to_any_worker_that_did_not_start_it(
    start_server: Callable[..., Server],
) -> None:
    server = start_server("--start-timeout", "1")
    first = await Peer.connect(server.ws_url, "twice")
    first.start_jobs = False
    try:
        job_id = await dispatch(server, "twice", "twice-dropped")
        await wait_for(lambda: first.assignments, 10, "the first assignment")
        second = await Peer.connect(server.ws_url, "twice")
        second.start_jobs = False
        try:
            await wait_for(lambda: second.assignments, 10, "the second assignment")
            await wait_for(
                lambda: server.metric("voicefleet_offers_total", outcome="not_started") == 2,
                10,
                "the second start timeout",
            )
            await asyncio.sleep(1.5)  # passes over the workers every 0.25 s meanwhile
            assert (len(first.offers), len(second.offers)) == (1, 1)
            assert server.job(job_id)["state"] == "pending"  # type: ignore[index]
        finally:
            await second.close()
    finally:
        await first.close()


async def test_silent_worker_is_disconnected_and_its_jobs_fail_with_the_reason(
    start_server: Callable[..., Server],
) -> None:
    server = start_server("--worker-silence-timeout", "1.5")
    peer = await Peer.connect(server.ws_url, "silent")
    peer.end_jobs = False
    try:
        job_id = await dispatch(server, "silent", "silent-call", JobRestartPolicy.JRP_NEVER)
        job = await wait_for(
            lambda: (j := server.job(job_id)) and j["state"] == "failed" and j, 15, "the failure"
        )
        assert "sent nothing for 1.5s" in job["error"]
        assert server.workers("silent") == []
    finally:
        await peer.close()


async def test_a_worker_that_reconnects_within_the_grace_keeps_its_job_else_the_next_one_gets_it(
    start_server: Callable[..., Server],
) -> None:
    server = start_server("--redispatch-grace", "2")
    first = await Peer.connect(server.ws_url, "flaky")
    first.end_jobs = False
    other = await Peer.connect(server.ws_url, "flaky")
    other.end_jobs = False
    peers = [first, other]
    try:
        # Its connection drops; it comes back at once and says it still runs the job.
        kept = await dispatch(server, "flaky", "flaky-kept")
        await wait_for(lambda: (j := server.job(kept)) and j["state"] == "running", 10, "start")
        holder = first if first.assignments else other
        idle = other if holder is first else first
        await holder.close()
        back = await Peer.connect(server.ws_url, "flaky")
        back.end_jobs = False
        peers.append(back)
        await back.send(agent.WorkerMessage(migrate_job=agent.MigrateJobRequest(job_ids=[kept])))
        await wait_for(
            lambda: (j := server.job(kept)) and j["worker_id"] == back.worker_id, 10, "adoption"
        )
        await asyncio.sleep(3)  # past the grace: nothing moved
        job = server.job(kept)
        assert job is not None and job["state"] == "running" and job["redispatches"] == 0
        assert kept not in idle.offers

        # The worker that took it drops and never comes back: the idle one gets it after the
        # grace, the same job in the same room, started again.
        await back.close()
        moved = await wait_for(
            lambda: (
                (j := server.job(kept))
                and j["worker_id"] == idle.worker_id
                and j["state"] == "running"  # assigned first, running once the worker says so
                and j
            ),
            15,
            "the job running on the other worker",
        )
        assert moved["redispatches"] == 1
        assert idle.assignments[-1].job.id == kept
        assert idle.assignments[-1].job.room.name == "flaky-kept"
    finally:
        for peer in peers:
            await peer.close()


async def test_a_queued_job_no_worker_can_take_holds_up_no_job_behind_it(server: Server) -> None:
    # production routes to v1, staging to v2; only a production v1 worker is there.
    admin = {"Authorization": f"Bearer {admin_token()}"}
    for deployment, version in (("production", "v1"), ("staging", "v2")):
        r = httpx.put(
            f"{server.url}/api/v1/routing/hol",
            json={"weights": {version: 100}, "deployment": deployment},
            headers=admin,
        )
        assert r.status_code == 200, r.text
    key, secret = tokens.instance_credentials(
        DEV_SECRET, tokens.WorkerIdentity(agent="CA_hol", version="v1", instance="hol-v1-1")
    )
    peer = await Peer.connect(
        server.ws_url, "hol", token=worker_jwt(key, secret), deployment="production"
    )
    lk = api.LiveKitAPI(server.url, DEV_KEY, DEV_SECRET)
    try:
        staging = await lk.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(agent_name="hol", room="s", deployment="staging")
        )
        [waiting] = staging.state.jobs
        production = await lk.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(agent_name="hol", room="p", deployment="production")
        )
        [call] = production.state.jobs
        # The production call goes to the free v1 worker now, not after the staging job's
        # queue timeout (60 s); the staging job keeps waiting for a v2 worker.
        await wait_for(lambda: call.id in {a.job.id for a in peer.assignments}, 20, "the call")
        assert waiting.id not in peer.offers
        assert (server.job(waiting.id) or {}).get("state") == "pending"
    finally:
        await lk.aclose()
        await peer.close()


async def test_a_worker_that_never_reports_job_status_keeps_its_jobs_past_the_start_timeout(
    start_server: Callable[..., Server],
) -> None:
    # Node's @livekit/agents 1.9 sends no job status at all: taking its job back would put a
    # second agent in the room. (A real Node worker: tests/test_outcomes.py.)
    server = start_server("--start-timeout", "1")
    silent = await Peer.connect(server.ws_url, "nodelike", reports_jobs=False)
    silent.start_jobs = False
    try:
        job_id = await dispatch(server, "nodelike", "nodelike-call")
        await wait_for(lambda: silent.assignments, 10, "the assignment")
        other = await Peer.connect(server.ws_url, "nodelike")
        try:
            await wait_for(
                lambda: "reports no job status; it stays" in server.log(), 10, "the start timeout"
            )
            job = server.job(job_id)
            assert job is not None and job["state"] == "assigned", job
            assert job["worker_id"] == silent.worker_id and other.offers == []
            assert server.metric("voicefleet_offers_total", outcome="not_started") == 0
        finally:
            await other.close()
    finally:
        await silent.close()


async def test_no_credential_reaches_the_log_even_at_debug_level(
    start_server: Callable[..., Server],
) -> None:
    # uvicorn logs a WebSocket handshake's request headers at debug level, Authorization too.
    server = start_server("--log-level", "debug")
    token = worker_jwt()
    peer = await Peer.connect(server.ws_url, "logged", token=token)
    await peer.close()
    forged = "wt-forged-" + "x" * 20  # refused, its request logged all the same
    with pytest.raises(aiohttp.WSServerHandshakeError):
        await Peer.connect(server.ws_url, "logged", token=token, params={"worker_token": forged})

    def logged() -> str | None:
        text = server.log()
        return text if "authorization: Bearer [redacted]" in text else None

    log = await wait_for(logged, 10, "the handshake's headers in the debug log")
    assert token not in log and forged not in log
