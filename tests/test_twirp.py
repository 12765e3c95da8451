"""AgentDispatchService over Twirp with the real livekit-api client, and LiveKit webhooks."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from google.protobuf import json_format
from livekit import api
from livekit.protocol import models, webhook
from prometheus_client.parser import text_string_to_metric_families

from tests.peers import Peer
from tests.support import (
    DEV_KEY,
    DEV_SECRET,
    Server,
    Worker,
    admin_token,
    job_in,
    ran_to_its_end,
    release,
    wait_for,
)
from voicefleet.protocol import tokens

TWIRP = "/twirp/livekit.AgentDispatchService"


def room_token(room: str, **video: object) -> str:
    return tokens.mint(DEV_KEY, DEV_SECRET, video={"roomAdmin": True, "room": room, **video})


async def test_create_list_and_delete_with_the_livekit_api_client(server: Server) -> None:
    peer = await Peer.connect(server.ws_url, "twirp-agent")
    peer.end_jobs = False
    lk = api.LiveKitAPI(server.url, DEV_KEY, DEV_SECRET)
    try:
        created = await lk.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(
                agent_name="twirp-agent", room="twirp-room", metadata='{"x": 1}'
            )
        )
        assert created.id.startswith("AD_") and created.room == "twirp-room"
        job_id = created.state.jobs[0].id
        await wait_for(lambda: peer.assignments, 10, "the assignment")

        [listed] = await lk.agent_dispatch.list_dispatch("twirp-room")
        assert listed.id == created.id and listed.metadata == '{"x": 1}'
        assert listed.state.jobs[0].state.worker_id == peer.worker_id
        assert await lk.agent_dispatch.list_dispatch("another-room") == []

        deleted = await lk.agent_dispatch.delete_dispatch(created.id, "twirp-room")
        assert deleted.id == created.id
        await wait_for(lambda: peer.terminations == [job_id], 10, "JobTermination to the worker")
        assert server.job(job_id)["state"] == "terminated"  # type: ignore[index]
        assert await lk.agent_dispatch.list_dispatch("twirp-room") == []

        with pytest.raises(api.TwirpError) as missing:
            await lk.agent_dispatch.delete_dispatch(created.id, "twirp-room")
        assert missing.value.code == "not_found"
    finally:
        await lk.aclose()
        await peer.close()


@pytest.mark.parametrize(
    ("token", "status", "code"),
    [
        (lambda: room_token("other-room"), 403, "permission_denied"),
        (lambda: tokens.mint(DEV_KEY, DEV_SECRET, video={"room": "r"}), 403, "permission_denied"),
        (
            lambda: tokens.mint(DEV_KEY, "wrong", video={"roomAdmin": True, "room": "r"}),
            401,
            "unauthenticated",
        ),
        (lambda: "garbage", 401, "unauthenticated"),
    ],
)
def test_dispatch_api_needs_room_admin_for_that_room(
    server: Server, token: Callable[[], str], status: int, code: str
) -> None:
    r = httpx.post(
        server.url + TWIRP + "/CreateDispatch",
        json={"agent_name": "x", "room": "r"},
        headers={"Authorization": f"Bearer {token()}"},
    )
    assert r.status_code == status and r.json()["code"] == code and r.json()["msg"]


def test_json_requests_get_json_answers_and_bad_bodies_get_twirp_errors(server: Server) -> None:
    auth = {"Authorization": f"Bearer {room_token('json-room')}"}
    r = httpx.post(
        server.url + TWIRP + "/CreateDispatch",
        json={"agent_name": "json-agent", "room": "json-room"},
        headers=auth,
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    assert r.json()["room"] == "json-room" and r.json()["id"].startswith("AD_")

    bad = httpx.post(
        server.url + TWIRP + "/CreateDispatch",
        content=b"\xff\xff\xff",
        headers={**auth, "Content-Type": "application/protobuf"},
    )
    assert bad.status_code == 400 and bad.json()["code"] == "malformed"
    unknown = httpx.post(server.url + TWIRP + "/Nope", json={}, headers=auth)
    assert unknown.status_code == 404 and unknown.json()["code"] == "bad_route"
    # Twirp routes by Content-Type too: anything but protobuf or JSON is a bad route.
    text = httpx.post(
        server.url + TWIRP + "/CreateDispatch",
        content=b"agent_name=x",
        headers={**auth, "Content-Type": "text/plain"},
    )
    assert text.status_code == 404 and text.json()["code"] == "bad_route", text.text
    assert "text/plain" in text.json()["msg"]
    # Over 1 MiB is refused, whether announced by Content-Length or streamed in chunks.
    huge = b"\x0a" * (2 << 20)
    declared = httpx.post(
        server.url + TWIRP + "/CreateDispatch",
        content=huge,
        headers={**auth, "Content-Type": "application/protobuf"},
    )
    chunked = httpx.post(
        server.url + TWIRP + "/CreateDispatch",
        content=(huge[i : i + 65536] for i in range(0, len(huge), 65536)),
        headers={**auth, "Content-Type": "application/protobuf"},
    )
    for r in (declared, chunked):
        assert r.status_code == 400 and "over 1048576 bytes" in r.json()["msg"], r.text
    no_room = httpx.post(
        server.url + TWIRP + "/CreateDispatch",
        json={"agent_name": "x"},
        headers={"Authorization": f"Bearer {room_token('')}"},
    )
    assert no_room.status_code == 400 and "room is required" in no_room.json()["msg"]


async def test_queued_job_fails_with_a_reason_and_a_full_queue_refuses(
    start_server: Callable[..., Server],
) -> None:
    # The agent's own quota (half the queue's by default) out of the way: the queue's is tested.
    server = start_server(
        "--queue-timeout", "1", "--queue-limit", "2", "--queue-limit-per-agent", "2"
    )
    lk = api.LiveKitAPI(server.url, DEV_KEY, DEV_SECRET)
    try:
        first = await lk.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(agent_name="nobody", room="q1")
        )
        await lk.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(agent_name="nobody", room="q2")
        )
        with pytest.raises(api.TwirpError) as full:
            await lk.agent_dispatch.create_dispatch(
                api.CreateAgentDispatchRequest(agent_name="nobody", room="q3")
            )
        assert full.value.code == "resource_exhausted" and "queue is full" in full.value.message
        job = await job_in(server, first.state.jobs[0].id, "failed", timeout=10)
        assert job["error"] == "no worker registered for agent 'nobody' within 1s"
    finally:
        await lk.aclose()


def signed_webhook(event: webhook.WebhookEvent, secret: str = DEV_SECRET) -> tuple[bytes, str]:
    body = json_format.MessageToJson(event).encode()
    digest = base64.b64encode(hashlib.sha256(body).digest()).decode()
    token = api.AccessToken(DEV_KEY, secret).with_sha256(digest).to_jwt()
    return body, token


async def test_room_started_webhook_dispatches_the_configured_agents_once(
    start_server: Callable[..., Server],
) -> None:
    server = start_server("--auto-dispatch", "greeter")
    room = f"webhook-room-{os.getpid()}"
    event = webhook.WebhookEvent(
        event="room_started", id="EV_1", room=models.Room(name=room, sid="RM_hook")
    )
    body, token = signed_webhook(event)
    hook = server.url + "/webhooks/livekit"
    r = httpx.post(hook, content=body, headers={"Authorization": token})
    assert r.status_code == 200 and len(r.json()["dispatches"]) == 1
    again = httpx.post(hook, content=body, headers={"Authorization": token})
    assert again.json()["dispatches"] == []  # LiveKit retried: nothing new

    lk = api.LiveKitAPI(server.url, DEV_KEY, DEV_SECRET)
    try:
        [d] = await lk.agent_dispatch.list_dispatch(room)
        assert d.agent_name == "greeter" and d.state.jobs[0].room.sid == "RM_hook"
    finally:
        await lk.aclose()

    other = webhook.WebhookEvent(event="participant_left", id="EV_2", room=models.Room(name=room))
    body2, token2 = signed_webhook(other)
    assert httpx.post(hook, content=body2, headers={"Authorization": token2}).json() == {
        "dispatches": []
    }


def test_webhooks_with_a_bad_signature_or_body_are_refused(server: Server) -> None:
    event = webhook.WebhookEvent(event="room_started", id="EV_x", room=models.Room(name="x"))
    body, token = signed_webhook(event)
    hook = server.url + "/webhooks/livekit"
    tampered = body.replace(b'"x"', b'"y"')
    r = httpx.post(hook, content=tampered, headers={"Authorization": token})
    assert r.status_code == 401 and "sha256" in r.json()["error"]
    assert httpx.post(hook, content=body).status_code == 401
    _, forged = signed_webhook(event, secret="not-the-secret")
    assert httpx.post(hook, content=body, headers={"Authorization": forged}).status_code == 401


# -- Queue quotas and metric labels: what one caller's dispatches may take from the others ----
# (No worker registered for an agent: each of its jobs waits in the queue, counted until it
# leaves it.)


async def create(lk: api.LiveKitAPI, agent: str, room: str, **metadata: object) -> str:
    """CreateDispatch through the real livekit-api client; the job's id."""
    d = await lk.agent_dispatch.create_dispatch(
        api.CreateAgentDispatchRequest(agent_name=agent, room=room, metadata=json.dumps(metadata))
    )
    return d.state.jobs[0].id


async def refused(lk: api.LiveKitAPI, agent: str, room: str) -> str:
    """CreateDispatch that must be refused as resource_exhausted; the error's message."""
    with pytest.raises(api.TwirpError) as e:
        await create(lk, agent, room)
    assert e.value.code == "resource_exhausted", e.value
    return e.value.message


async def test_a_room_at_its_queue_quota_is_refused_while_other_rooms_and_agents_still_dispatch(
    start_server: Callable[..., Server],
) -> None:
    server = start_server("--queue-limit-per-room", "3", "--queue-limit-per-agent", "5")
    lk = api.LiveKitAPI(server.url, DEV_KEY, DEV_SECRET)
    try:
        for _ in range(3):
            await create(lk, "quota-a", "quota-flood")
        full_room = await refused(lk, "quota-a", "quota-flood")
        assert "room 'quota-flood'" in full_room and "--queue-limit-per-room" in full_room
        assert "--queue-limit-per-room" in await refused(lk, "quota-b", "quota-flood")

        # Other rooms still get their dispatches, up to the agent's own quota (5 waiting).
        await create(lk, "quota-a", "quota-r1")
        await create(lk, "quota-a", "quota-r2")
        full_agent = await refused(lk, "quota-a", "quota-r3")
        assert "agent 'quota-a'" in full_agent and "--queue-limit-per-agent" in full_agent
        await create(lk, "quota-b", "quota-r3")  # another agent, in that same room

        # A job that leaves the queue gives its place back, in its room and to its agent.
        first, *_ = await lk.agent_dispatch.list_dispatch("quota-flood")
        await lk.agent_dispatch.delete_dispatch(first.id, "quota-flood")
        await create(lk, "quota-a", "quota-flood")
        assert "--queue-limit-per-room" in await refused(lk, "quota-b", "quota-flood")
        assert "--queue-limit-per-agent" in await refused(lk, "quota-a", "quota-r4")
    finally:
        await lk.aclose()


async def test_queued_jobs_that_reach_a_worker_free_their_room_and_a_call_in_flight_finishes(
    start_server: Callable[..., Server], start_worker: Callable[..., Worker], markers: Path
) -> None:
    server = start_server("--queue-limit-per-room", "2")
    lk = api.LiveKitAPI(server.url, DEV_KEY, DEV_SECRET)
    try:
        live = start_worker(server, "quota-live")
        await live.registered()
        call = await create(lk, "quota-live", "quota-call", until_released=True)
        await job_in(server, call, "running")

        # Jobs for an agent no worker serves yet fill the room's quota: the room is refused...
        waiting = [await create(lk, "quota-late", "quota-call") for _ in range(2)]
        assert "--queue-limit-per-room" in await refused(lk, "quota-late", "quota-call")
        # ...and its call goes on: quotas count jobs waiting for a worker, never running ones.
        assert (await job_in(server, call, "running"))["worker_id"] == live.id

        # A worker arrives, the waiting jobs leave the queue, the room takes dispatches again.
        await start_worker(server, "quota-late").registered()
        for job_id in waiting:
            await ran_to_its_end(server, markers, job_id)
        await ran_to_its_end(server, markers, await create(lk, "quota-late", "quota-call"))

        release(markers, call)
        assert (await ran_to_its_end(server, markers, call))["worker_id"] == live.id
    finally:
        await lk.aclose()


async def test_metrics_label_only_known_agents_and_stay_parseable(
    start_server: Callable[..., Server],
) -> None:
    server = start_server()
    long_name = "x" * 10_000
    control_chars = 'nul\x00new\nline\x07"}'
    # Known agents: one a worker registered with (full, so its job waits), one with a routing
    # entry (to a version no worker has, so its job waits).
    peer = await Peer.connect(server.ws_url, "metrics-known")
    lk = api.LiveKitAPI(server.url, DEV_KEY, DEV_SECRET)
    try:
        await peer.status(full=True)
        await wait_for(
            lambda: [w["status"] for w in server.workers("metrics-known")] == ["full"],
            10,
            "the worker to report full",
        )
        routed = httpx.put(
            server.url + "/api/v1/routing/metrics-routed",
            json={"weights": {"v9": 100}},
            headers={"Authorization": f"Bearer {admin_token()}"},
        )
        assert routed.status_code == 200, routed.text

        for i, name in enumerate((long_name, control_chars, "metrics-known", "metrics-routed")):
            await job_in(server, await create(lk, name, f"metrics-{i}"), "pending")

        text = httpx.get(server.url + "/metrics").text
        assert long_name not in text and "\x00" not in text and "nul" not in text
        families = {f.name: f for f in text_string_to_metric_families(text)}
        queued = {
            s.labels["agent_name"]: s.value for s in families["voicefleet_queued_jobs"].samples
        }
        assert queued == {"(unknown)": 2, "metrics-known": 1, "metrics-routed": 1}, queued
    finally:
        await lk.aclose()
        await peer.close()
