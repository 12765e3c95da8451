"""API keys with roles, on a real `vf server`: keys made with `vf server keys` on its data dir,
used by the API, the `vf` CLI and the dashboard; every change an event that says who, when,
what and from where (`vf events`, GET /api/v1/events)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import Server, admin_token, wait_for
from tests.test_deploy import AGENT_SRC


def run_vf(*args: str, env: dict[str, str] | None = None, ok: bool = True) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "voicefleet", *args],
        env={**os.environ, "VOICEFLEET_API_KEY": "", **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )
    if ok:
        assert result.returncode == 0, f"vf {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def make_key(server: Server, role: str, *extra: str) -> dict[str, Any]:
    """`vf server keys create` on the running server's data dir: the key, with its token."""
    out = run_vf(
        "server", "keys", "create", "--role", role, "--data-dir", str(server.data_dir),
        "--json", *extra,
    )  # fmt: skip
    key: dict[str, Any] = json.loads(out)
    assert re.fullmatch(r"vfk_[0-9a-f]{12}\.[A-Za-z0-9_-]{43}", key["token"])
    return key


def call(server: Server, token: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(
        method,
        f"{server.url}/api/v1{path}",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
        **kwargs,
    )


def project(server: Server, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return call(server, admin_token(), method, path, **kwargs)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The module's own server: its keys and events are this module's alone."""
    server = Server(tmp_path_factory.mktemp("roles-server")).start()
    for name in ("shop", "bank"):
        project(server, "POST", "/agents", json={"name": name}).raise_for_status()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def keys(srv: Server) -> dict[str, str]:
    """A token per role, for every agent."""
    return {role: make_key(srv, role, "--name", f"{role}-key")["token"] for role in (
        "viewer", "deployer", "admin")}  # fmt: skip


FLAG = {"type": "boolean", "value": True}


def test_each_role_may_do_its_share_and_is_told_which_role_the_rest_needs(
    srv: Server, keys: dict[str, str]
) -> None:
    # (method, path, body) -> the least role it needs.
    cases: list[tuple[str, str, dict[str, Any] | None, str]] = [
        ("GET", "/agents", None, "viewer"),
        ("GET", "/agents/shop", None, "viewer"),
        ("GET", "/agents/shop/events", None, "viewer"),
        ("GET", "/events", None, "viewer"),
        ("GET", "/jobs", None, "viewer"),
        ("POST", "/agents/shop/scale", {"replicas": 0}, "deployer"),
        ("PUT", "/agents/shop/flags/greet", FLAG, "deployer"),
        ("POST", "/agents/shop/flags/greet/kill", None, "deployer"),
        ("PUT", "/agents/shop/secrets", {"secrets": {"TOKEN": "x"}}, "admin"),
        ("PATCH", "/agents/shop", {"grace_period": 10}, "admin"),
        ("GET", "/keys", None, "admin"),
    ]
    ranks = ["viewer", "deployer", "admin"]
    refused = {}
    for method, path, body, least in cases:
        for role, token in keys.items():
            r = call(srv, token, method, path, json=body)
            if ranks.index(role) >= ranks.index(least):
                assert r.status_code < 300, (role, method, path, r.text)
            else:
                assert r.status_code == 403, (role, method, path, r.text)
                detail = r.json()["detail"]
                assert f"needs the {least} role" in detail and f"is a {role}" in detail, detail
                refused[(role, method, path)] = detail
    assert refused[("viewer", "POST", "/agents/shop/scale")] == (
        "POST /api/v1/agents/shop/scale needs the deployer role; key "
        f"{keys['viewer'].partition('.')[0]} (viewer-key) is a viewer"
    )
    # A deployer rolls back and rolls out (refused by the control plane here: nothing was
    # deployed; the point is that the role let it through).
    r = call(srv, keys["deployer"], "POST", "/agents/shop/rollback", json={})
    assert r.status_code == 400 and "no earlier version" in r.text
    assert call(srv, keys["viewer"], "POST", "/agents/shop/rollback", json={}).status_code == 403
    r = call(srv, keys["deployer"], "POST", "/agents/shop/canary/abort")
    assert r.status_code == 400 and "no canary" in r.text
    # Agents and keys are an admin's to make and delete.
    for role in ("viewer", "deployer"):
        assert call(srv, keys[role], "POST", "/agents", json={"name": "made"}).status_code == 403
        assert call(srv, keys[role], "POST", "/keys", json={"role": "admin"}).status_code == 403
    assert call(srv, keys["admin"], "POST", "/agents", json={"name": "made"}).status_code == 201
    assert call(srv, keys["deployer"], "DELETE", "/agents/made").status_code == 403
    assert call(srv, keys["admin"], "DELETE", "/agents/made").status_code == 204
    names = [a["name"] for a in call(srv, keys["viewer"], "GET", "/agents").json()]
    assert "made" not in names and {"shop", "bank"} <= set(names)


def test_a_key_limited_to_one_agent_acts_on_it_alone(srv: Server) -> None:
    token = make_key(srv, "deployer", "--agent", "shop")["token"]
    assert call(srv, token, "POST", "/agents/shop/scale", json={"replicas": 0}).status_code == 200
    r = call(srv, token, "POST", "/agents/bank/scale", json={"replicas": 0})
    assert r.status_code == 403 and "limited to agent shop" in r.json()["detail"]
    # By id as well as by name.
    bank = project(srv, "GET", "/agents/bank").json()["agent"]["id"]
    assert call(srv, token, "GET", f"/agents/{bank}").status_code == 403
    assert call(srv, token, "GET", "/agents/bank/flags").status_code == 403
    # What is about every agent: refused, or narrowed to its own.
    assert call(srv, token, "GET", "/workers").status_code == 403
    assert [a["name"] for a in call(srv, token, "GET", "/agents").json()] == ["shop"]
    events = call(srv, token, "GET", "/events").json()["events"]
    assert events and {e["agent"] for e in events} == {"shop"}
    assert call(srv, token, "GET", "/events", params={"agent": "bank"}).status_code == 403
    # Its agent deleted, the key is refused, and listed as such.
    project(srv, "POST", "/agents", json={"name": "fleeting"}).raise_for_status()
    fleeting = make_key(srv, "viewer", "--agent", "fleeting")
    assert call(srv, fleeting["token"], "GET", "/agents/fleeting").status_code == 200
    project(srv, "DELETE", "/agents/fleeting").raise_for_status()
    r = call(srv, fleeting["token"], "GET", "/agents/fleeting")
    assert r.status_code == 401 and "agent that has been deleted" in r.json()["detail"]
    listed = {k["id"]: k["state"] for k in project(srv, "GET", "/keys").json()}
    assert listed[fleeting["id"]] == "agent deleted"


async def test_revoked_expired_unknown_and_wrong_keys_are_refused_with_401(srv: Server) -> None:
    key = make_key(srv, "admin", "--name", "to-revoke")
    assert call(srv, key["token"], "GET", "/agents").status_code == 200
    # Revoked on the data dir while the server runs: refused from the next request on.
    run_vf("server", "keys", "revoke", key["id"], "--data-dir", str(srv.data_dir))
    r = call(srv, key["token"], "GET", "/agents")
    assert r.status_code == 401 and r.json()["detail"] == f"API key {key['id']} was revoked"
    # Revoked through the API by an admin key.
    other = make_key(srv, "viewer")
    admin = make_key(srv, "admin")["token"]
    assert call(srv, admin, "DELETE", f"/keys/{other['id']}").json()["state"] == "revoked"
    assert call(srv, other["token"], "GET", "/agents").status_code == 401
    # Expired: a key made to last a second is refused once the second is over.
    short = make_key(srv, "viewer", "--expires", "1s")

    def refused() -> bool:
        r = call(srv, short["token"], "GET", "/agents")
        return r.status_code == 401 and "has expired" in r.json()["detail"]

    await wait_for(refused, timeout=10, what="the 1 s key to be refused")
    # Unknown, wrong secret, malformed.
    key_id, _, secret = admin.partition(".")
    bad = {
        f"{key_id}.{secret[::-1]}": "wrong secret",
        f"vfk_000000000000.{secret}": "unknown API key",
        f"{key_id}.short": "malformed",
    }
    for token, said in bad.items():
        r = call(srv, token, "GET", "/agents")
        assert r.status_code == 401 and said in r.json()["detail"], (token, r.text)
    listed = {k["id"]: k["state"] for k in json.loads(run_vf(
        "server", "keys", "list", "--data-dir", str(srv.data_dir), "--json"))}  # fmt: skip
    assert listed[key["id"]] == "revoked" and listed[short["id"]] == "expired"
    assert listed[admin.partition(".")[0]] == "active"


def test_a_key_is_stored_as_a_hash_only(srv: Server) -> None:
    key = make_key(srv, "admin", "--name", "hashed")
    secret = key["token"].partition(".")[2]
    assert call(srv, key["token"], "GET", "/agents").status_code == 200
    # Every byte the store has on disk (the database and its write-ahead log).
    stored = b"".join(p.read_bytes() for p in srv.data_dir.glob("voicefleet.db*"))
    assert key["id"].encode() in stored  # the right files were read
    assert secret.encode() not in stored
    assert hashlib.sha256(secret.encode()).hexdigest().encode() not in stored  # peppered
    db = sqlite3.connect(srv.data_dir / "voicefleet.db")
    try:
        (digest,) = db.execute("select digest from api_keys where id = ?", (key["id"],)).fetchone()
    finally:
        db.close()
    assert len(digest) == 64 and secret not in digest
    # Nor in the server's log (its requests' Authorization headers are redacted).
    assert secret not in srv.log()
    # Neither the API nor `vf server keys list` shows a digest.
    listed = call(srv, key["token"], "GET", "/keys").json()
    assert all("digest" not in k and "token" not in k for k in listed)


def test_the_project_key_stays_an_admin(srv: Server) -> None:
    r = project(srv, "POST", "/keys", json={"role": "viewer", "name": "made-by-project"})
    assert r.status_code == 201, r.text
    made = r.json()
    assert call(srv, made["token"], "GET", "/agents").status_code == 200
    assert project(srv, "PUT", "/agents/bank/secrets", json={"secrets": {"A": "b"}}).is_success
    assert project(srv, "DELETE", f"/keys/{made['id']}").status_code == 200


def test_every_change_is_an_event_with_who_when_what_and_from_where(
    srv: Server, keys: dict[str, str]
) -> None:
    start = time.time()
    deployer, admin = keys["deployer"], keys["admin"]
    deployer_id, admin_id = deployer.partition(".")[0], admin.partition(".")[0]
    assert call(srv, deployer, "POST", "/agents/bank/scale", json={"replicas": 0}).is_success
    assert call(srv, deployer, "PUT", "/agents/bank/flags/fast", json=FLAG).is_success
    assert call(srv, deployer, "DELETE", "/agents/bank/flags/fast").is_success
    assert call(
        srv, deployer, "PUT", "/routing/elsewhere", json={"weights": {"v1": 100}}
    ).is_success
    assert call(srv, admin, "PUT", "/agents/bank/secrets", json={"secrets": {"K": "v"}}).is_success
    assert call(srv, admin, "DELETE", "/agents/bank/secrets", params={"name": "K"}).is_success
    assert call(srv, admin, "POST", "/agents", json={"name": "brief"}).status_code == 201
    assert call(srv, admin, "DELETE", "/agents/brief").status_code == 204
    made = call(srv, admin, "POST", "/keys", json={"role": "viewer", "expires": "7d"}).json()
    assert call(srv, admin, "DELETE", f"/keys/{made['id']}").is_success

    # The API: filtered by time, paged.
    got = call(srv, keys["viewer"], "GET", "/events", params={"since": str(start)}).json()
    mine = [e for e in got["events"] if e["actor"] in (deployer_id, admin_id)]
    kinds = [(e["kind"], e["actor"]) for e in reversed(mine)]
    assert kinds == [
        ("scaled", deployer_id),
        ("flag_created", deployer_id),
        ("flag_deleted", deployer_id),
        ("routing_set", deployer_id),
        ("secrets_set", admin_id),
        ("secrets_unset", admin_id),
        ("agent_created", admin_id),
        ("agent_deleted", admin_id),
        ("key_created", admin_id),
        ("key_revoked", admin_id),
    ]
    for e in mine:
        assert e["ip"] == "127.0.0.1" and e["via"] == "api" and start <= e["at"] <= time.time()
        assert e["actor_name"] in ("deployer-key", "admin-key")
    assert next(e for e in mine if e["kind"] == "scaled")["agent"] == "bank"
    assert next(e for e in mine if e["kind"] == "agent_deleted")["message"] == "agent brief deleted"
    assert made["id"] in next(e for e in mine if e["kind"] == "key_revoked")["message"]
    pages: list[dict[str, Any]] = []
    params: dict[str, Any] = {"since": str(start), "limit": 3, "changes": "true"}
    while True:
        page = call(srv, keys["viewer"], "GET", "/events", params=params).json()
        pages += page["events"]
        if page["next"] is None:
            break
        params["before"] = page["next"]
    assert [e["id"] for e in pages] == [e["id"] for e in got["events"] if e["actor"]]
    only = call(srv, keys["viewer"], "GET", "/events", params={"agent": "bank", "kind": "scaled"})
    assert {(e["agent"], e["kind"]) for e in only.json()["events"]} == {("bank", "scaled")}
    r = call(srv, keys["viewer"], "GET", "/events", params={"since": "yesterday-ish"})
    assert r.status_code == 400 and "is not a time" in r.json()["detail"]

    # `vf events`, signed in with a viewer key from the environment.
    env = {"VF_URL": srv.url, "VOICEFLEET_API_KEY": keys["viewer"], "VF_API_KEY": "nobody"}
    listed = json.loads(run_vf("events", "--agent", "bank", "--since", "1h", "--json", env=env))
    assert [e["kind"] for e in listed if e["actor"] == admin_id][:2] == [
        "secrets_unset", "secrets_set"]  # fmt: skip
    table = run_vf("events", "--actor", deployer_id, "--limit", "2", env=env)
    assert "routing_set" in table and "flag_deleted" in table and "scaled" not in table
    assert f"{deployer_id} (deployer-key)" in table and "127.0.0.1" in table
    # The CLI's other commands take the key too, and its role holds there.
    refused = subprocess.run(
        [sys.executable, "-m", "voicefleet", "agent", "scale", "1", "--id", "bank"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 3 and "needs the deployer role" in refused.stderr


@pytest.mark.timeout(600)
def test_a_deployer_key_deploys_and_rolls_back_with_the_cli_and_the_events_name_it(
    srv: Server, tmp_path: Path
) -> None:
    token = make_key(srv, "deployer", "--name", "ci")["token"]
    key_id = token.partition(".")[0]
    folder = tmp_path / "keyed"
    shutil.copytree(AGENT_SRC, folder)
    (folder / "VERSION").write_text("one")
    project(srv, "POST", "/agents", json={"name": "keyed"}).raise_for_status()
    (folder / "livekit.toml").write_text('[project]\nsubdomain = ""\n\n[agent]\nid = "keyed"\n')
    env = {"VF_URL": srv.url, "VOICEFLEET_API_KEY": token}
    for version in ("one", "two"):
        (folder / "VERSION").write_text(version)
        subprocess.run(
            [sys.executable, "-m", "voicefleet", "agent", "deploy"],
            cwd=folder, env={**os.environ, **env}, check=True, capture_output=True, timeout=600,
        )  # fmt: skip
    run_vf("agent", "rollback", "--id", "keyed", env=env)
    events = call(srv, token, "GET", "/events", params={"agent": "keyed"}).json()["events"]
    by_key = [(e["kind"], e["via"], e["ip"]) for e in events if e["actor"] == key_id]
    assert ("rollback_started", "api", "127.0.0.1") in by_key
    assert [k for k, _, _ in by_key].count("deploy_started") == 2
    assert [k for k, _, _ in by_key].count("version_uploaded") == 2


# -- the dashboard ------------------------------------------------------------------------


def log_in(srv: Server, key: str, secret: str = "") -> httpx.Client:
    client = httpx.Client(base_url=srv.url, timeout=30)
    client.post("/dashboard/login", data={"api_key": key, "api_secret": secret, "next": "/"})
    return client


def csrf(page: str) -> str:
    found = re.search(r'<meta name="csrf" content="([^"]+)"', page)
    assert found is not None
    return found.group(1)


def test_a_viewer_key_sees_the_dashboard_but_cannot_act(srv: Server) -> None:
    viewer = make_key(srv, "viewer", "--name", "looker")
    client = log_in(srv, viewer["token"])
    assert client.cookies.get("vf_session")
    for path in ("/", "/dashboard/agents/shop", "/dashboard/flags", "/dashboard/instances"):
        r = client.get(path)
        assert r.status_code == 200, (path, r.status_code)
        assert "/actions" not in r.text and 'name="command"' not in r.text, path
    page = client.get("/dashboard/agents/shop").text
    token = csrf(page)  # a session's token (for logging out): not enough to act
    r = client.post(
        "/dashboard/agents/shop/actions",
        data={"command": "scale", "replicas": "0", "csrf": token},
        headers={"X-CSRF-Token": token},
    )
    assert r.status_code == 403 and "needs the deployer role" in r.json()["detail"]
    r = client.post(
        "/dashboard/flags/shop",
        data={"command": "create", "key": "sneaky", "type": "boolean", "value": "true"},
        headers={"X-CSRF-Token": token},
    )
    assert r.status_code == 403
    flags = call(srv, viewer["token"], "GET", "/agents/shop/flags").json()
    assert "sneaky" not in [f["key"] for f in flags]
    # The same key's id in the key field and its secret in the secret field logs in too.
    key_id, _, secret = viewer["token"].partition(".")
    assert log_in(srv, key_id, secret).get("/").status_code == 200
    # Revoked: its session ends at the next request.
    run_vf("server", "keys", "revoke", viewer["id"], "--data-dir", str(srv.data_dir))
    r = client.get("/dashboard/agents/shop")
    assert r.status_code == 303 and r.headers["location"].startswith("/dashboard/login")


def test_a_deployer_key_acts_from_the_dashboard_and_the_event_says_so(srv: Server) -> None:
    deployer = make_key(srv, "deployer", "--name", "oncall")
    client = log_in(srv, deployer["token"])
    page = client.get("/dashboard/agents/shop").text
    token = csrf(page)
    r = client.post(
        "/dashboard/agents/shop/actions",
        data={"command": "scale", "replicas": "0", "deployment": "production"},
        headers={"X-CSRF-Token": token},
    )
    assert r.status_code == 202, r.text
    (event,) = [
        e
        for e in project(srv, "GET", "/events", params={"agent": "shop", "kind": "scaled"}).json()[
            "events"
        ]
        if e["actor"] == deployer["id"]
    ]
    assert event["via"] == "dashboard" and event["ip"] == "127.0.0.1"
    assert event["actor_name"] == "oncall"


def test_a_key_limited_to_one_agent_cannot_log_in_to_the_dashboard(srv: Server) -> None:
    scoped = make_key(srv, "admin", "--agent", "shop")
    client = httpx.Client(base_url=srv.url, timeout=30)
    r = client.post("/dashboard/login", data={"api_key": scoped["token"], "api_secret": ""})
    assert r.status_code == 403 and "limited to agent shop" in r.text
    assert not client.cookies.get("vf_session")
    assert scoped["token"].partition(".")[2] not in r.text  # the secret is not echoed back
    r = client.post("/dashboard/login", data={"api_key": "vfk_000000000000", "api_secret": "x"})
    assert r.status_code == 401
