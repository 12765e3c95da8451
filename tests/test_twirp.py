"""AgentDispatchService over Twirp with the real livekit-api client, and LiveKit webhooks."""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Callable

import httpx
import pytest
from google.protobuf import json_format
from livekit import api
from livekit.protocol import models, webhook

from tests.peers import Peer
from tests.support import DEV_KEY, DEV_SECRET, Server, wait_for
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
    server = start_server("--queue-timeout", "1", "--queue-limit", "2")
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
        job_id = first.state.jobs[0].id
        job = await wait_for(
            lambda: (j := server.job(job_id)) and j["state"] == "failed" and j, 10, "expiry"
        )
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
