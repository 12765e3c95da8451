"""Feature flags: evaluation, `vf flags`, the SDK client against a real server (and without it),
the OpenFeature provider, and a real deployed agent seeing a flip in its next session."""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from livekit import api
from openfeature.evaluation_context import EvaluationContext
from openfeature.flag_evaluation import Reason

from tests.support import DEV_KEY, DEV_SECRET, Server, admin_token, started, wait_for
from tests.test_deploy import AGENT_SRC, dispatch, vf
from voicefleet.flags.service import FlagService
from voicefleet.sdk import FlagsClient, Session
from voicefleet.sdk.evaluate import evaluate, validate
from voicefleet.sdk.openfeature import VoicefleetProvider
from voicefleet.store.db import open_engine
from voicefleet.store.models import AgentRow
from voicefleet.store.repo import Repo

# -- evaluation ---------------------------------------------------------------------------------


def flag(**kw: Any) -> dict[str, Any]:
    return validate({"key": "f", "type": "boolean", "value": False, **kw})


def test_a_percentage_is_stable_per_session_and_splits_sessions_by_its_share() -> None:
    f = flag(rules=[{"when": [], "percent": 20, "value": True}])
    sessions = [Session(dispatch_id=f"AD_{secrets.token_hex(6)}") for _ in range(10_000)]
    first = [evaluate(f, s)[0] for s in sessions]
    assert [evaluate(f, s)[0] for s in sessions] == first  # same session, same answer
    # Binomial(10,000, 0.2): sd 40; 4 sd either side.
    assert abs(sum(first) - 2000) <= 160
    # Raising the share keeps everyone who had it (a superset), as a rollout should.
    wider = flag(rules=[{"when": [], "percent": 50, "value": True}])
    assert all(evaluate(wider, s)[0] for s, had in zip(sessions, first, strict=True) if had)
    # Without a dispatch id the room is the session.
    assert Session(room="r1").key == "r1"


def test_rules_on_room_metadata_and_attributes_first_match_wins() -> None:
    f = validate(
        {
            "key": "voice", "type": "string", "value": "alloy",
            "rules": [
                {"when": [{"attr": "room", "op": "prefix", "value": "vip-"}], "value": "nova"},
                {"when": [{"attr": "attributes.lang", "op": "in", "value": ["fr", "de"]}],
                 "value": "echo"},
                {"when": [{"attr": "metadata.tier", "value": "gold"}], "value": "sage"},
            ],
        }
    )  # fmt: skip
    assert evaluate(f, Session(room="vip-1", attributes={"lang": "fr"})) == ("nova", "rule 1")
    assert evaluate(f, Session(room="r", attributes={"lang": "de"})) == ("echo", "rule 2")
    assert evaluate(f, Session(room="r", metadata='{"tier": "gold"}')) == ("sage", "rule 3")
    assert evaluate(f, Session(room="r", metadata="not json")) == ("alloy", "default")
    killed = validate({**f, "killed": True, "off": "alloy"})
    assert evaluate(killed, Session(room="vip-1")) == ("alloy", "killed")


def test_conditions_compare_json_values_as_their_json_text() -> None:
    f = flag(rules=[{"when": [{"attr": "metadata.vip", "value": True}], "value": True}])
    assert evaluate(f, Session(room="r", metadata='{"vip": true}')) == (True, "rule 1")
    assert evaluate(f, Session(room="r", metadata='{"vip": "true"}')) == (True, "rule 1")
    assert evaluate(f, Session(room="r", metadata='{"vip": false}')) == (False, "default")
    n = flag(rules=[{"when": [{"attr": "metadata.tier", "op": "in", "value": [1, 2]}],
                     "value": True}])  # fmt: skip
    assert evaluate(n, Session(room="r", metadata='{"tier": 2}'))[0] is True


def test_openfeature_context_values_become_what_a_job_carries() -> None:
    from voicefleet.sdk.openfeature import session_of

    ctx = EvaluationContext("AD_9", {"room": "r", "metadata": {"vip": True}, "beta": True})
    session = session_of(ctx)
    assert (session.metadata, session.attributes) == ('{"vip": true}', {"beta": "true"})
    when = [{"attr": "metadata.vip", "value": True}, {"attr": "attributes.beta", "value": "true"}]
    f = flag(rules=[{"when": when, "value": True}])
    assert evaluate(f, session) == (True, "rule 1")


def test_without_a_session_percentages_admit_nobody_but_plain_rules_apply() -> None:
    f = flag(rules=[{"when": [], "percent": 99.99, "value": True}])
    assert evaluate(f, Session()) == (False, "default")
    everyone = flag(rules=[{"when": [], "value": True}])
    assert evaluate(everyone, Session()) == (True, "rule 1")


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"key": "a b", "type": "boolean", "value": True}, "flag key"),
        ({"key": "stream", "type": "boolean", "value": True}, "'stream' is reserved"),
        ({"key": "a", "type": "list", "value": True}, "type must be"),
        ({"key": "a", "type": "number", "value": True}, "must be a number"),
        ({"key": "a", "type": "boolean", "value": True,
          "rules": [{"when": [], "percent": 150, "value": True}]}, "percent"),
        ({"key": "a", "type": "boolean", "value": True,
          "rules": [{"when": [{"attr": "room", "op": "regex", "value": "x"}], "value": True}]},
         "op"),
        ({"key": "a", "type": "string", "value": "x", "rules": [{"when": [], "value": 3}]},
         "must be a string"),
        ({"key": "a", "type": "boolean", "value": True, "rules": {"when": []}}, "is a list"),
        ({"key": "a", "type": "boolean", "value": True, "rules": ["x"]}, "not an object"),
        ({"key": "a", "type": "boolean", "value": True, "rules": [{"when": "room"}]},
         "list of conditions"),
        ({"key": "a", "type": "boolean", "value": True,
          "rules": [{"when": [{"attr": "roomname", "value": "x"}], "value": True}]},
         "attr 'roomname' is not"),
        ({"key": "a", "type": "boolean", "value": True,
          "rules": [{"when": [{"attr": "room", "op": "prefix", "value": ["x"]}], "value": True}]},
         "only 'in' takes a list"),
        ({"key": "a", "type": "boolean", "value": True,
          "rules": [{"when": [], "percent": True, "value": True}]}, "percent"),
    ],
)  # fmt: skip
def test_bad_definitions_say_what_is_wrong(bad: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate(bad)


# -- against a real server ----------------------------------------------------------------------


def vf_flags(server: Server, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VF_URL": server.url, "VF_API_KEY": DEV_KEY, "VF_API_SECRET": DEV_SECRET}
    result = subprocess.run(
        [sys.executable, "-m", "voicefleet", "flags", *args],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if ok:
        assert result.returncode == 0, f"vf flags {args}:\n{result.stdout}\n{result.stderr}"
    return result


def test_flag_changes_go_through_while_streams_come_and_go(tmp_path: Path) -> None:
    """Streams (one per running agent) wait for changes with a timeout and are cancelled when
    their agent disconnects; none of that may hold up a change (it once left a lock taken, and
    a flag set from the dashboard waited forever). Real store; run in a thread so that a hang
    fails the test instead of hanging the suite."""
    done: list[int] = []
    errors: list[BaseException] = []

    async def scenario() -> None:
        engine = await open_engine(f"sqlite+aiosqlite:///{tmp_path / 'store.db'}")
        repo = Repo(engine)
        await repo.save(AgentRow(id="CA_1", name="bot", grace_period=60, created_at=0.0))
        service = FlagService(repo)
        await service.start()
        rng = random.Random(7)

        async def stream() -> None:
            seen = -1
            while True:
                seen = service.version("CA_1")
                await service.wait_change("CA_1", seen, rng.choice([0.0005, 0.002, 1.0]))

        def failed(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and task.exception() is not None:
                errors.append(task.exception())  # type: ignore[arg-type]

        streams: set[asyncio.Task[None]] = set()
        for n in range(200):
            while len(streams) < 20:
                task = asyncio.create_task(stream())
                task.add_done_callback(failed)
                streams.add(task)
            gone = rng.choice(sorted(streams, key=id))
            streams.discard(gone)
            asyncio.get_running_loop().call_later(rng.random() * 0.002, gone.cancel)
            await service.set("CA_1", {"key": "k", "type": "boolean", "value": n % 2 == 1})
            done.append(n)
            await asyncio.sleep(rng.random() * 0.002)
        for task in streams:
            task.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
        await engine.dispose()

    runner = threading.Thread(target=lambda: asyncio.run(scenario()), daemon=True)
    runner.start()
    runner.join(60)
    assert not runner.is_alive(), f"a flag change waited forever after {len(done)} changes"
    assert errors == []
    assert len(done) == 200


def create_agent(server: Server, name: str) -> str:
    r = httpx.post(
        f"{server.url}/api/v1/agents",
        json={"name": name},
        headers={"Authorization": f"Bearer {admin_token()}"},
    )
    r.raise_for_status()
    return str(r.json()["id"])


def test_vf_flags_set_get_list_kill_delete_with_events(server: Server) -> None:
    agent_id = create_agent(server, "flags-cli")
    out = vf_flags(server, "set", "flags-cli", "new_voice", "true", "--percent", "25",
                   "--when", "room=prefix:vip-")  # fmt: skip
    assert 'new_voice = false; 25% where room prefix "vip-": true' in out.stdout
    data = json.loads(vf_flags(server, "--json", "get", "flags-cli", "new_voice").stdout)
    assert data["type"] == "boolean" and data["updated_by"] == DEV_KEY
    assert data["rules"][0]["when"] == [{"attr": "room", "op": "prefix", "value": "vip-"}]
    # Evaluated for one session: a room outside the rule gets the default.
    got = vf_flags(server, "get", "flags-cli", "new_voice", "--room", "plain-1").stdout
    assert "new_voice = false (default)" in got
    vf_flags(server, "set", "flags-cli", "speed", "1.25", "--when", "attributes.tier=gold",
             "--default", "1")  # fmt: skip
    got = vf_flags(server, "get", "flags-cli", "speed", "--room", "r", "--attr", "tier=gold").stdout
    assert "speed = 1.25 (rule 1)" in got
    listed = vf_flags(server, "list", "flags-cli").stdout
    assert "new_voice" in listed and "speed" in listed and "number" in listed
    vf_flags(server, "kill", "flags-cli", "new_voice")
    got = vf_flags(server, "get", "flags-cli", "new_voice", "--room", "vip-1").stdout
    assert "new_voice = false (killed)" in got
    vf_flags(server, "delete", "flags-cli", "speed")
    missing = vf_flags(server, "get", "flags-cli", "speed", ok=False)
    assert missing.returncode == 4 and "no flag 'speed'" in missing.stderr
    bad = vf_flags(server, "set", "flags-cli", "n", "x", "--type", "number", ok=False)
    assert bad.returncode == 2 and "not a number" in bad.stderr

    events = httpx.get(
        f"{server.url}/api/v1/agents/{agent_id}/events",
        headers={"Authorization": f"Bearer {admin_token()}"},
    ).json()
    kinds = [(e["kind"], e["actor"]) for e in events if e["kind"].startswith("flag_")]
    assert kinds == [
        ("flag_deleted", DEV_KEY), ("flag_killed", DEV_KEY), ("flag_created", DEV_KEY),
        ("flag_created", DEV_KEY),
    ]  # fmt: skip
    assert all(e["at"] > 0 for e in events)


def test_sdk_sees_changes_within_a_second_and_keeps_working_while_the_server_is_down(
    start_server: Callable[..., Server], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = start_server()
    agent_id = create_agent(server, "flags-sdk")
    headers = {"Authorization": f"Bearer {admin_token()}"}

    def put(value: Any) -> None:
        r = httpx.put(
            f"{server.url}/api/v1/agents/{agent_id}/flags/greeting",
            json={"type": "string", "value": value},
            headers=headers,
        )
        r.raise_for_status()

    put("hello")
    cache = tmp_path / "flags.json"
    client = FlagsClient(server.url, agent_id, DEV_KEY, DEV_SECRET, cache_path=cache).start()
    try:
        assert client.wait_ready(5)
        assert client.get_str("greeting") == "hello"
        version = client.version
        began = time.monotonic()
        put("bonjour")
        assert client.wait_version(version, 1.0), "a change must arrive within 1 s"
        print(f"flag change reached the client in {(time.monotonic() - began) * 1e3:.1f} ms")
        assert client.get_str("greeting") == "bonjour"

        provider = VoicefleetProvider(client)
        details = provider.resolve_string_details("greeting", "x", EvaluationContext("AD_1"))
        assert (details.value, details.reason) == ("bonjour", Reason.DEFAULT)
        wrong = provider.resolve_boolean_details("greeting", False)
        assert wrong.value is False and wrong.error_code is not None

        server.stop()
        deadline = time.monotonic() + 5
        while client.source != "cached" and time.monotonic() < deadline:
            time.sleep(0.01)  # the stream ends when the server stops: the client notices
        assert client.source == "cached"
        assert client.get_str("greeting") == "bonjour"  # from its copy, server down
        details = provider.resolve_string_details("greeting", "x")
        assert (details.value, details.reason) == ("bonjour", Reason.CACHED)
    finally:
        client.close()

    # A process started while the server is down: the cache file, else the environment.
    late = FlagsClient(server.url, agent_id, DEV_KEY, DEV_SECRET, cache_path=cache).start()
    try:
        assert late.get_str("greeting") == "bonjour" and late.source == "cached"
    finally:
        late.close()
    monkeypatch.setenv("VOICEFLEET_FLAG_GREETING", "salut")
    monkeypatch.setenv("VOICEFLEET_FLAG_MAX_TURNS", "12")
    bare = FlagsClient(server.url, agent_id, DEV_KEY, DEV_SECRET, cache_path=tmp_path / "none")
    assert bare.get_str("greeting") == "salut" and bare.get_number("max_turns") == 12
    assert bare.get_bool("missing", True) is True
    static = VoicefleetProvider(bare).resolve_integer_details("max_turns", 3)
    assert (static.value, static.reason) == (12, Reason.STATIC)
    assert VoicefleetProvider(bare).resolve_boolean_details("greeting", True).value is True


def test_a_deleted_agents_draining_instances_keep_their_flags(
    server: Server, tmp_path: Path
) -> None:
    agent_id = create_agent(server, "flags-deleted")
    headers = {"Authorization": f"Bearer {admin_token()}"}
    r = httpx.put(
        f"{server.url}/api/v1/agents/{agent_id}/flags/greeting",
        json={"type": "string", "value": "hello"},
        headers=headers,
    )
    r.raise_for_status()
    cache = tmp_path / "flags.json"
    client = FlagsClient(server.url, agent_id, DEV_KEY, DEV_SECRET, cache_path=cache).start()
    try:
        assert client.wait_ready(5) and client.get_str("greeting") == "hello"
        version = client.version
        r = httpx.delete(f"{server.url}/api/v1/agents/{agent_id}", headers=headers)
        assert r.status_code == 204, r.text
        # Calls still running on its draining instances go on with the flags they had.
        assert not client.wait_version(version, 2.5)
        assert client.get_str("greeting") == "hello"
    finally:
        client.close()


def test_stream_refuses_other_agents_instances_room_tokens_and_bad_tokens(server: Server) -> None:
    from voicefleet.protocol.tokens import WorkerIdentity, instance_credentials, mint

    agent_id = create_agent(server, "flags-auth")
    other = WorkerIdentity(agent="CA_someoneelse", version="v1", instance="i1")
    key, secret = instance_credentials(DEV_SECRET, other)
    url = f"{server.url}/api/v1/agents/{agent_id}/flags/stream"
    r = httpx.get(url, headers={"Authorization": f"Bearer {mint(key, secret, video={})}"})
    assert r.status_code == 403 and "may not read the flags" in r.text
    # A participant's room token is signed with the project's key too: not enough.
    room_token = mint(DEV_KEY, DEV_SECRET, video={"roomJoin": True, "room": "r1"})
    r = httpx.get(url, headers={"Authorization": f"Bearer {room_token}"})
    assert r.status_code == 403 and "agent admin grant" in r.text
    r = httpx.get(url, headers={"Authorization": "Bearer not-a-token"})
    assert r.status_code == 401
    # Strangers learn nothing of which agents exist.
    r = httpx.get(f"{server.url}/api/v1/agents/nobody/flags/stream")
    assert r.status_code == 401


async def test_a_running_agent_sees_a_flipped_flag_in_its_next_session(
    start_server: Callable[..., Server], tmp_path: Path
) -> None:
    server = start_server()
    markers = tmp_path / "markers"
    markers.mkdir()
    folder = tmp_path / "my-agent"
    shutil.copytree(AGENT_SRC, folder)
    (folder / "THREADS").write_text("one worker process: one flag client")
    vf(server, folder, "create")
    vf(server, folder, "secrets", "set", f"MARKER_DIR={markers}")
    vf(server, folder, "deploy")
    vf_flags(server, "set", "my-agent", "greeting", "hello")
    lk = api.LiveKitAPI(server.url, DEV_KEY, DEV_SECRET)
    try:
        first = await dispatch(lk, "flag-1")
        marker = await wait_for(lambda: started(markers, first), 60, "the first session")
        assert marker["greeting"] == "hello"
        [instance] = [i for i in server._get("/api/v1/agents/my-agent")["instances"]]

        vf_flags(server, "set", "my-agent", "greeting", "bonjour")
        time.sleep(1.0)  # the promise: within 1 s, no restart
        second = await dispatch(lk, "flag-2")
        marker = await wait_for(lambda: started(markers, second), 60, "the second session")
        assert marker["greeting"] == "bonjour"
        assert marker["instance"] == instance["id"]  # the same process: no restart
        vf_flags(server, "kill", "my-agent", "greeting")
        time.sleep(1.0)
        third = await dispatch(lk, "flag-3")
        marker = await wait_for(lambda: started(markers, third), 60, "the third session")
        assert marker["greeting"] == ""  # a killed string flag gives its off value
        # Its copy for when the server is down: in the data dir, not the shared temp dir.
        agent_id = server._get("/api/v1/agents/my-agent")["agent"]["id"]
        cache = json.loads((server.data_dir / "agents" / agent_id / "flags-cache.json").read_text())
        assert [f["key"] for f in cache["flags"]] == ["greeting"]
    finally:
        await lk.aclose()


def put_flag(server: Server, agent_id: str, key: str, body: dict[str, Any]) -> None:
    r = httpx.put(
        f"{server.url}/api/v1/agents/{agent_id}/flags/{key}",
        json=body,
        headers={"Authorization": f"Bearer {admin_token()}"},
    )
    r.raise_for_status()


def test_openfeature_provider_resolves_values_with_their_reasons(
    server: Server, tmp_path: Path
) -> None:
    from openfeature.exception import ErrorCode

    agent_id = create_agent(server, "flags-openfeature")
    rules = [
        {"when": [{"attr": "room", "op": "prefix", "value": "vip-"}], "value": "nova"},
        {"when": [], "percent": 50, "value": "echo"},
    ]
    put_flag(server, agent_id, "voice", {"type": "string", "value": "alloy", "rules": rules})
    put_flag(server, agent_id, "turns", {"type": "number", "value": 1.5})
    client = FlagsClient(server.url, agent_id, DEV_KEY, DEV_SECRET, cache_path=tmp_path / "c")
    provider = VoicefleetProvider(client.start())
    try:
        assert client.wait_ready(5)
        vip = provider.resolve_string_details(
            "voice", "x", EvaluationContext("AD_1", {"room": "vip-1"})
        )
        assert (vip.value, vip.reason, vip.variant) == ("nova", Reason.TARGETING_MATCH, "rule 1")
        # Sessions by dispatch id: half get the 50 % rule (a split), half the default.
        got = {
            d.reason: d.value
            for d in (
                provider.resolve_string_details("voice", "x", EvaluationContext(f"AD_{i}"))
                for i in range(40)
            )
        }
        assert got == {Reason.SPLIT: "echo", Reason.DEFAULT: "alloy"}
        assert provider.resolve_float_details("turns", 0.0).value == 1.5
        not_int = provider.resolve_integer_details("turns", 7)
        assert (not_int.value, not_int.error_code) == (7, ErrorCode.TYPE_MISMATCH)
        missing = provider.resolve_boolean_details("nope", True)
        assert (missing.value, missing.error_code) == (True, ErrorCode.FLAG_NOT_FOUND)
        assert provider.resolve_object_details("voice", {}).error_code == ErrorCode.TYPE_MISMATCH

        version = client.version
        r = httpx.post(
            f"{server.url}/api/v1/agents/{agent_id}/flags/voice/kill",
            headers={"Authorization": f"Bearer {admin_token()}"},
        )
        r.raise_for_status()
        assert client.wait_version(version, 1.0)
        killed = provider.resolve_string_details("voice", "x", EvaluationContext("AD_1"))
        assert (killed.value, killed.reason) == ("", Reason.DISABLED)
    finally:
        client.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX")
def test_a_client_started_before_a_fork_streams_again_in_the_child(
    server: Server, tmp_path: Path
) -> None:
    """livekit-agents forks job processes from a forkserver; if it imported the agent (a
    `preload_modules` entry), the child inherits a client whose thread did not come along."""
    agent_id = create_agent(server, "flags-fork")
    put_flag(server, agent_id, "mode", {"type": "string", "value": "before"})
    client = FlagsClient(server.url, agent_id, DEV_KEY, DEV_SECRET, cache_path=tmp_path / "c")
    client.start()
    try:
        assert client.wait_ready(5)
        ready_r, ready_w = os.pipe()
        result_r, result_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report what it sees, never return into pytest
            try:
                os.write(ready_w, b"x")
                deadline = time.monotonic() + 5
                while client.get_str("mode") != "after" and time.monotonic() < deadline:
                    client.wait_version(client.version, 0.1)
                os.write(result_w, client.get_str("mode").encode())
            finally:
                os._exit(0)
        assert os.read(ready_r, 1) == b"x"
        put_flag(server, agent_id, "mode", {"type": "string", "value": "after"})
        assert os.read(result_r, 100) == b"after"
        os.waitpid(pid, 0)
    finally:
        client.close()


def test_the_sdk_copy_for_agents_imports_with_the_standard_library_alone(tmp_path: Path) -> None:
    """Agents' environments have none of voicefleet's dependencies: `python -S` has no site
    packages at all, so any import beyond the standard library fails here."""
    from voicefleet.flags.install import install_sdk

    root = install_sdk(tmp_path)
    assert install_sdk(tmp_path) == root  # a second start replaces the copy
    code = f"""
import sys
sys.path.insert(0, {str(root)!r})
from voicefleet.sdk import FlagsClient, Session
assert __import__("voicefleet").__file__.startswith({str(root)!r})
client = FlagsClient("http://127.0.0.1:9", "CA_x", "k", "s", cache_path={str(tmp_path / "none")!r})
assert client.get_bool("f", True, session=Session(room="r")) is True
assert "openfeature" not in sys.modules
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-S", "-E", "-c", code], capture_output=True, text=True, timeout=30
    )
    assert result.stdout.strip() == "ok", result.stderr
