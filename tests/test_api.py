"""The control API in-process: `create_app` (its composition root included) over
`httpx.ASGITransport`, with a real store in tmp_path. No socket, no process: milliseconds per
request. What needs running instances or a build is tested end to end (test_deploy.py)."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from voicefleet.config import Project, Settings
from voicefleet.protocol import tokens
from voicefleet.server import create_app

KEY, SECRET = "apikey", "apisecret-long-enough-for-hmac-sha256!"


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app's `/api/v1`, signed with the project's admin credential."""
    app = create_app(Settings(data_dir=tmp_path, keep_instances=False), Project("t", KEY, SECRET))
    async with app.router.lifespan_context(app):
        token = tokens.mint_admin(KEY, SECRET)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://test/api/v1",
            headers={"Authorization": f"Bearer {token}"},
        ) as client:
            yield client


async def test_an_agent_is_created_listed_shown_and_deleted(api: httpx.AsyncClient) -> None:
    r = await api.post("/agents", json={"name": "bot", "grace_period": 30})
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["id"].startswith("CA_") and created["grace_period"] == 30
    listed = (await api.get("/agents")).json()
    assert [(a["name"], a["deployments"]) for a in listed] == [("bot", {"production": ""})]
    status = (await api.get("/agents/bot")).json()
    assert [d["name"] for d in status["deployments"]] == ["production"]
    assert status["instances"] == [] and status["rollouts"] == [] and status["overflow"] == []
    assert (await api.delete("/agents/bot")).status_code == 204
    assert (await api.get("/agents/bot")).status_code == 404


async def test_a_second_agent_of_the_same_name_is_refused(api: httpx.AsyncClient) -> None:
    await api.post("/agents", json={"name": "twice"})
    r = await api.post("/agents", json={"name": "twice"})
    assert r.status_code == 400 and "already exists" in r.json()["detail"]


async def test_without_a_token_nothing_is_answered(api: httpx.AsyncClient) -> None:
    r = await api.get("/agents", headers={"Authorization": ""})
    assert r.status_code == 401


async def test_secrets_are_listed_by_name_never_by_value(api: httpx.AsyncClient) -> None:
    await api.post("/agents", json={"name": "keeper"})
    r = await api.put("/agents/keeper/secrets", json={"secrets": {"OPENAI_API_KEY": "sk-123"}})
    assert r.json() == {"set": ["OPENAI_API_KEY"]}
    listed = (await api.get("/agents/keeper/secrets")).json()
    assert [s["name"] for s in listed] == ["OPENAI_API_KEY"] and "sk-123" not in str(listed)
    r = await api.delete("/agents/keeper/secrets", params={"name": "OPENAI_API_KEY"})
    assert r.json() == {"removed": 1}


async def test_file_secrets_are_checked_then_merged_or_replace_the_set(
    api: httpx.AsyncClient,
) -> None:
    await api.post("/agents", json={"name": "filer"})
    await api.put("/agents/filer/secrets", json={"secrets": {"KEEP": "1"}})
    content = base64.b64encode(b"key material").decode()
    for bad in ("../escape", "a/b", "..", "", "x" * 201):
        r = await api.put("/agents/filer/secrets", json={"files": {bad: content}})
        assert r.status_code == 400 and "secret file name" in r.json()["detail"], bad
    r = await api.put("/agents/filer/secrets", json={"files": {"k.pem": "not base64!"}})
    assert r.status_code == 422
    too_big = base64.b64encode(b"x" * (1024 * 1024 + 1)).decode()
    r = await api.put("/agents/filer/secrets", json={"files": {"big.bin": too_big}})
    assert r.status_code == 400 and "the limit is 1048576" in r.json()["detail"]
    r = await api.put(  # one bad name in the request: nothing of it is stored
        "/agents/filer/secrets", json={"secrets": {"OK": "1", "1BAD": "x"}, "files": {}}
    )
    assert r.status_code == 400
    assert [s["name"] for s in (await api.get("/agents/filer/secrets")).json()] == ["KEEP"]
    r = await api.put("/agents/filer/secrets", json={"files": {"k.pem": content}})
    assert r.json() == {"set": ["k.pem"]}
    listed = (await api.get("/agents/filer/secrets")).json()
    assert [(s["name"], s["kind"]) for s in listed] == [("KEEP", "env"), ("k.pem", "file")]
    assert "key material" not in str(listed) and content not in str(listed)
    r = await api.put("/agents/filer/secrets", json={"secrets": {"ONLY": "1"}, "overwrite": True})
    assert r.json() == {"set": ["ONLY"]}
    assert [s["name"] for s in (await api.get("/agents/filer/secrets")).json()] == ["ONLY"]


async def test_agents_are_listed_by_id_or_name_with_what_they_serve(
    api: httpx.AsyncClient,
) -> None:
    a = (await api.post("/agents", json={"name": "first"})).json()
    await api.post("/agents", json={"name": "second"})
    listed = (await api.get("/agents", params={"id": [a["id"], "second"]})).json()
    assert [x["name"] for x in listed] == ["first", "second"]
    assert listed[0]["serving"] == [
        {"deployment": "production", "version": "", "instances": 0, "sessions": 0}
    ]
    r = await api.get("/agents", params={"id": "nobody"})
    assert r.status_code == 404


async def test_a_bad_plan_is_refused_at_the_edge_before_any_upload(api: httpx.AsyncClient) -> None:
    await api.post("/agents", json={"name": "planned"})
    r = await api.post(
        "/agents/planned/versions", params={"plan": '{"strategy": "sideways"}'}, content=b"x"
    )
    assert r.status_code == 400 and "unknown strategy 'sideways'" in r.json()["detail"]
    r = await api.post(
        "/agents/planned/rollouts",
        json={"version": "v1", "plan": {"strategy": "canary", "steps": [50, 10]}},
    )
    assert r.status_code == 400 and "canary steps must grow" in r.json()["detail"]
    assert (await api.get("/agents/planned/versions")).json() == []


async def test_rollouts_of_an_agent_are_read_by_id(api: httpx.AsyncClient) -> None:
    await api.post("/agents", json={"name": "rolled"})
    assert (await api.get("/agents/rolled/rollouts")).json() == []
    r = await api.get("/agents/rolled/rollouts/RO_nope")
    assert r.status_code == 404 and "no rollout 'RO_nope'" in r.json()["detail"]
    r = await api.post("/agents/rolled/rollback", json={})
    assert r.status_code == 400 and "no earlier version" in r.json()["detail"]


async def test_routing_by_hand_is_for_agents_voicefleet_does_not_deploy(
    api: httpx.AsyncClient,
) -> None:
    r = await api.put("/routing/handmade", json={"weights": {"v1": 90, "v2": 10}})
    assert r.status_code == 200 and r.json() == {"v1": 90, "v2": 10}
    assert (await api.get("/routing")).json()["handmade/production"] == {"v1": 90, "v2": 10}
    await api.post("/agents", json={"name": "deployed"})
    r = await api.put("/routing/deployed", json={"weights": {"v1": 100}})
    assert r.status_code == 409


async def test_workers_and_jobs_start_empty(api: httpx.AsyncClient) -> None:
    assert (await api.get("/workers")).json() == []
    assert (await api.get("/jobs")).json() == []
    assert (await api.get("/jobs/AJ_nope")).status_code == 404


async def test_scaling_sets_a_size_or_a_policy(api: httpx.AsyncClient) -> None:
    await api.post("/agents", json={"name": "sized"})
    r = await api.post("/agents/sized/scale", json={"replicas": 3})
    assert r.json() == {
        "deployment": "production",
        "version": "",
        "replicas": 3,
        "autoscale": None,
    }
    r = await api.post(
        "/agents/sized/scale", json={"autoscale": {"min_instances": 0, "max_instances": 4}}
    )
    assert r.status_code == 200, r.text
    assert r.json()["autoscale"]["max_instances"] == 4
    events = [e["kind"] for e in (await api.get("/agents/sized/events")).json()]
    assert "scaled" in events and "autoscale_set" in events
