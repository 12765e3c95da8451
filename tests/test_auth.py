"""Who may do what, and what a stranger's request costs the server: the control API takes only
the project's agent admin grant; bodies are capped before they are buffered; an instance's key
reaches only its own calls."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from livekit import api

from tests.support import DEV_KEY, DEV_SECRET, Server, Worker, admin_token, started, wait_for
from voicefleet.protocol import tokens

MiB = 1 << 20

# Tokens a LiveKit app hands out, signed with the project's own key, none of them meant for
# voicefleet's control API.
NOT_ADMIN = {
    "a room-scoped roomAdmin": {"video": {"roomAdmin": True, "room": "other-room"}},
    "a string 'false' grant": {"video": {"roomAdmin": "false"}},
    "a roomJoin-only participant": {"video": {"roomJoin": True, "room": "r1"}},
    "a string agent admin grant": {"video": {}, "agent": {"admin": "true"}},
    "a project-wide roomAdmin": {"video": {"roomAdmin": True}},
}


def control_routes(server: Server) -> Iterator[tuple[str, str]]:
    """Every (method, path) of /api/v1 in the server's own OpenAPI document, path parameters
    filled in: routes added later are covered without touching this test."""
    spec = httpx.get(server.url + "/openapi.json", timeout=10).json()
    for path, methods in spec["paths"].items():
        if path.startswith("/api/v1/"):
            for method in methods:
                yield method.upper(), re.sub(r"\{[^}]+\}", "x", path)


@pytest.mark.parametrize("kind", NOT_ADMIN)
def test_every_control_route_refuses_tokens_not_meant_for_it(server: Server, kind: str) -> None:
    claims = NOT_ADMIN[kind]
    token = tokens.mint(DEV_KEY, DEV_SECRET, video=claims["video"], **{
        k: v for k, v in claims.items() if k != "video"
    })  # fmt: skip
    routes = list(control_routes(server))
    assert len(routes) > 25 and ("GET", "/api/v1/agents/x/flags/stream") in routes
    answers = {}
    for method, path in routes:
        r = httpx.request(
            method,
            server.url + path,
            headers={"Authorization": f"Bearer {token}"},
            json={"name": "owned"},
            timeout=10,
        )
        answers[f"{method} {path}"] = r.status_code
    assert set(answers.values()) == {403}, {k: v for k, v in answers.items() if v != 403}
    # Nothing was created along the way.
    admin = {"Authorization": f"Bearer {admin_token()}"}
    names = [a["name"] for a in httpx.get(server.url + "/api/v1/agents", headers=admin).json()]
    assert "owned" not in names


def test_the_agent_admin_grant_of_the_project_key_opens_the_control_api(server: Server) -> None:
    admin = tokens.mint_admin(DEV_KEY, DEV_SECRET)
    r = httpx.get(server.url + "/api/v1/agents", headers={"Authorization": f"Bearer {admin}"})
    assert r.status_code == 200, r.text
    # The same grant from an instance's key is not the project's.
    key, secret = tokens.instance_credentials(
        DEV_SECRET, tokens.WorkerIdentity(agent="CA_x", version="v1", instance="i1")
    )
    r = httpx.get(
        server.url + "/api/v1/agents",
        headers={"Authorization": f"Bearer {tokens.mint_admin(key, secret)}"},
    )
    assert r.status_code == 403 and "project's key" in r.json()["detail"]


def test_openapi_lists_the_errors_and_the_text_log_endpoints(server: Server) -> None:
    spec = httpx.get(server.url + "/openapi.json", timeout=10).json()
    for path, methods in spec["paths"].items():
        if path.startswith("/api/v1/"):
            for method, op in methods.items():
                assert {"401", "403", "413"} <= set(op["responses"]), (method, path)
    logs = spec["paths"]["/api/v1/agents/{agent}/logs"]["get"]["responses"]["200"]["content"]
    assert "text/plain" in logs
    build = spec["paths"]["/api/v1/agents/{agent}/versions/{version}/log"]["get"]
    assert "text/plain" in build["responses"]["200"]["content"]
    upload = spec["paths"]["/api/v1/agents/{agent}/versions"]["post"]["responses"]
    assert "429" in upload


# -- what a request costs before it is trusted ---------------------------------------------


def peak_rss(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), in bytes: a spike between two
    samples is not missed."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/status")


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/status")


def post_big(url: str, size: int, headers: dict[str, str], declare: bool) -> int | None:
    """POST `size` bytes streamed in 1 MiB chunks (declared in Content-Length, or chunked);
    the status, or None when the server closed the connection before the client could read
    its answer (it refused to take the rest)."""
    chunk = b"x" * MiB

    def body() -> Iterator[bytes]:
        for _ in range(size // MiB):
            yield chunk

    if declare:
        headers = {**headers, "Content-Length": str(size)}
    try:
        return httpx.post(url, content=body(), headers=headers, timeout=60).status_code
    except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
        return None


def test_a_200_mb_body_leaves_the_server_memory_where_it_was(
    start_server: Callable[..., Server],
) -> None:
    server = start_server()
    assert server.proc is not None
    pid = server.proc.pid
    admin = {"Authorization": f"Bearer {admin_token()}", "Content-Type": "application/json"}
    # Warm up the paths once (imports, first allocations) so that only the bodies count.
    for path in ("/webhooks/livekit", "/api/v1/agents", "/twirp/livekit.AgentDispatchService/X"):
        httpx.post(server.url + path, content=b"{}", timeout=10)
    httpx.post(server.url + "/api/v1/agents", json={"name": "x"}, headers=admin).raise_for_status()
    before_peak, before = peak_rss(pid), rss(pid)
    # A stranger is told who may call (401), or, having declared a body over the route's cap,
    # that it is too large (413): either way before the body is read.
    cases = [
        ("/webhooks/livekit", {}, (401, 413)),
        ("/api/v1/agents", {}, (401, 413)),
        ("/api/v1/agents/x/versions", {}, (401, 413)),
        ("/api/v1/agents/x/flags/stream", {}, (401, 405, 413)),
        ("/twirp/livekit.AgentDispatchService/CreateDispatch", {}, (400, 404)),
        # Admitted callers are capped too: 1 MiB for JSON, the bundle limit for uploads.
        ("/api/v1/agents", admin, (413,)),
        ("/api/v1/agents/x/versions", admin, (413,)),
    ]
    answers = []
    for path, headers, expected in cases:
        for declare in (True, False):
            status = post_big(server.url + path, 200 * MiB, headers, declare)
            answers.append((path, declare, status))
            assert status in (*expected, None), (path, declare, status)
    grew = (peak_rss(pid) - before_peak) / MiB
    print(f"14 bodies of 200 MiB: peak RSS grew {grew:.1f} MiB, RSS {rss(pid) / MiB:.0f} MiB")
    assert grew < 50, f"peak RSS grew {grew:.0f} MiB: {answers}"
    assert (rss(pid) - before) / MiB < 50
    assert httpx.get(server.url + "/healthz").status_code == 200


async def test_uploads_beyond_four_at_once_are_refused_until_one_ends(server: Server) -> None:
    headers = {"Authorization": f"Bearer {admin_token()}", "Content-Type": "application/gzip"}
    httpx.post(
        server.url + "/api/v1/agents",
        json={"name": "uploads-at-once"},
        headers={"Authorization": headers["Authorization"]},
    ).raise_for_status()
    url = server.url + "/api/v1/agents/uploads-at-once/versions"
    host, port = server.url.removeprefix("http://").split(":")

    async def held_open() -> asyncio.StreamWriter:
        """An upload that sent its headers and a first part of its body, then waits."""
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            (
                "POST /api/v1/agents/uploads-at-once/versions HTTP/1.1\r\n"
                f"Host: {host}\r\nAuthorization: {headers['Authorization']}\r\n"
                "Content-Type: application/gzip\r\nContent-Length: 1000\r\n\r\n"
            ).encode()
            + b"x" * 10
        )
        await writer.drain()
        return writer

    held = [await held_open() for _ in range(4)]
    async with httpx.AsyncClient(timeout=60) as client:

        async def refused() -> bool:
            r = await client.post(url, content=b"junk", headers=headers)
            return r.status_code == 429 and "4 uploads are in progress" in r.json()["detail"]

        await wait_for(refused, 30, "a fifth upload to be refused", interval=0.2)
        for writer in held:
            writer.close()  # the held uploads end (cut short: nothing is built)

        async def taken() -> httpx.Response | None:
            r = await client.post(url, content=b"junk", headers=headers)
            return None if r.status_code == 429 else r

        r = await wait_for(taken, 30, "a slot to be free again", interval=0.2)
        assert r.status_code == 400 and "not a tar.gz bundle" in r.text, r.text
    assert (
        httpx.get(
            server.url + "/api/v1/agents/uploads-at-once/versions",
            headers={"Authorization": headers["Authorization"]},
        ).json()
        == []
    )


# -- an instance's key on AgentDispatchService ---------------------------------------------


async def test_an_instance_key_dispatches_only_into_rooms_where_it_runs_a_job(
    server: Server, start_worker: Callable[..., Worker], markers: Path
) -> None:
    identity = tokens.WorkerIdentity(agent="CA_keyscope", version="v1", instance="i-keyscope")
    key, secret = tokens.instance_credentials(DEV_SECRET, identity)
    worker = start_worker(server, "keyscope", LIVEKIT_API_KEY=key, LIVEKIT_API_SECRET=secret)
    await worker.registered()
    project = api.LiveKitAPI(server.url, DEV_KEY, DEV_SECRET)
    agent_code = api.LiveKitAPI(server.url, key, secret)  # what the agent's ctx.api holds
    try:
        d = await project.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(
                agent_name="keyscope", room="its-call", metadata=json.dumps({"hold": 60})
            )
        )
        job_id = d.state.jobs[0].id
        await wait_for(lambda: started(markers, job_id), 60, "the call to start")

        # Its own call: it may bring a second agent in, and see the room's dispatches.
        helper = await agent_code.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(agent_name="keyscope-helper", room="its-call")
        )
        listed = await agent_code.agent_dispatch.list_dispatch(room_name="its-call")
        assert {x.id for x in listed} == {d.id, helper.id}
        await agent_code.agent_dispatch.delete_dispatch(helper.id, "its-call")

        # Anyone else's room: refused, whatever the call.
        for attempt in (
            agent_code.agent_dispatch.create_dispatch(
                api.CreateAgentDispatchRequest(agent_name="keyscope", room="someone-else")
            ),
            agent_code.agent_dispatch.list_dispatch(room_name="someone-else"),
            agent_code.agent_dispatch.delete_dispatch(d.id, "someone-else"),
        ):
            with pytest.raises(api.TwirpError) as e:
                await attempt
            assert e.value.code == "permission_denied", e.value
            assert "only rooms where it runs a job" in e.value.message
        assert await project.agent_dispatch.list_dispatch(room_name="someone-else") == []
        # The call it was on goes on.
        job = server.job(job_id)
        assert job is not None and job["state"] == "running", job
    finally:
        await project.aclose()
        await agent_code.aclose()
