"""Calls in flight keep their audio to their end whatever voicefleet does meanwhile: a canary
aborted, a blue-green switch, a scale-down, a restart of `vf server` itself.

The rig of tests/test_calls.py (its fixtures are the session's, in tests/conftest.py): a real
livekit-server in a network namespace, `vf server` in it, the example voice agent
(examples/voice_agent) deployed with `vf agent deploy` from an environment built outside first,
and the caller simulator (tests/caller.py) speaking to it. Each case starts its calls, runs its
operation while they speak, and then asks of every call: each utterance was answered, at least
one of them after the operation; no gap opened in the agent's audio from the start of the
operation to the end of the call; the job stayed on the version and instance that took it and
ended succeeded (or failed with no reason at all: livekit-agents' exit-status race,
tests/support.py); the agent heard every utterance. The figures of each call are printed (run
with -s), not asserted."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from livekit import api

from tests.livekit import Caller, LiveKitServer, NsVoicefleet, print_figures, server_built
from tests.support import DEV_KEY, DEV_SECRET, NO_REASON, Seen, admin_token, wait_for

pytestmark = pytest.mark.timeout(300 if server_built() else 1800)

ENDED = ("succeeded", "failed", "terminated")


@dataclass
class Call:
    """One caller in a room of its own, and the job voicefleet gave the agent for it."""

    caller: Caller
    room: str
    job: dict[str, Any] = field(default_factory=dict)  # as it was once running
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class Scene:
    """One case: its agent, a copy of the built example, on a `vf server` in the namespace."""

    lk: LiveKitServer
    vf: NsVoicefleet
    folder: Path
    name: str
    calls: list[Call] = field(default_factory=list)
    began: float = 0.0  # the operation, on the monotonic clock
    finished: float = 0.0

    def agent(self, *args: str, code: int = 0) -> str:
        """`vf agent …` for this agent, inside the namespace: its exit code must be `code`;
        its output (stdout, then stderr)."""
        argv = [sys.executable, "-m", "voicefleet", "agent", *args]
        env = {**os.environ, "VF_URL": self.vf.url, "VF_API_KEY": DEV_KEY}
        env["VF_API_SECRET"] = DEV_SECRET
        done = self.lk.ns.run(
            argv, cwd=self.folder, env=env, capture_output=True, text=True, timeout=600
        )
        output = f"{done.stdout}\n{done.stderr}"
        assert done.returncode == code, f"vf agent {' '.join(args)}: {done.returncode}\n{output}"
        return output

    async def status(self) -> dict[str, Any]:
        found: dict[str, Any] = await self.vf.request("GET", f"/api/v1/agents/{self.name}")
        return found

    async def instances(self, version: str | None = None) -> list[dict[str, Any]]:
        found = (await self.status())["instances"]
        return [i for i in found if version is None or i["version"] == version]

    async def exited(self, version: str, what: str, but: str = "") -> list[dict[str, Any]]:
        """Wait until every instance of `version` (but the one `but`) has exited; them."""

        async def stopped() -> list[dict[str, Any]] | Seen:
            instances = [i for i in await self.instances(version) if i["id"] != but]
            if instances and all(i["status"] == "stopped" for i in instances):
                return instances
            return Seen([(i["id"], i["status"], i["sessions"]) for i in instances])

        found: list[dict[str, Any]] = await wait_for(stopped, 60, what, interval=0.2)
        return found

    def call(self, room: str, utterances: int) -> Call:
        """A caller that joins `room` now, speaks once the agent has greeted it, and goes on
        until `finish()`ed (at least `utterances` in all)."""
        caller = Caller(
            self.lk, room, self.folder.parent, "--utterances", str(utterances), until=True
        )
        return Call(caller, room)

    async def delete(self) -> None:
        """Delete the agent: its instances drain and exit. Best effort (a failure above says
        more)."""

        async def inside() -> None:
            async with httpx.AsyncClient(base_url=self.vf.url, timeout=10) as client:
                await client.delete(
                    f"/api/v1/agents/{self.name}",
                    headers={"Authorization": f"Bearer {admin_token()}"},
                )

        with contextlib.suppress(httpx.HTTPError):
            await self.lk.ns.call(inside)

    async def dispatch(self, call: Call) -> dict[str, Any]:
        """Once its caller is in the room, send the agent there; wait until its job runs."""
        await wait_for(call.caller.joined, 60, f"the caller to join {call.room}")
        request = api.CreateAgentDispatchRequest(agent_name=self.name, room=call.room)

        async def dispatch() -> None:
            client = api.LiveKitAPI(self.vf.url, DEV_KEY, DEV_SECRET)
            try:
                await client.agent_dispatch.create_dispatch(request)
            finally:
                await client.aclose()

        await self.lk.ns.call(dispatch)

        async def running() -> dict[str, Any] | Seen:
            jobs = await self.vf.jobs(call.room)
            if len(jobs) == 1 and jobs[0]["state"] == "running":
                return jobs[0]
            return Seen([(j["state"], j["error"]) for j in jobs])

        call.job = await wait_for(running, 60, f"the agent's job in {call.room} to run")
        return call.job


# -- the cases ---------------------------------------------------------------------------------
#
# Each one: what to do before the calls (`prepare`, the agent is created), how many utterances
# each of its callers speaks (`calls`), how to place them (`place`), the operation (`operate`,
# run once every caller has said something) and what else must hold once the calls ended
# (`check`).


async def serve_v1(scene: Scene) -> None:
    scene.agent("deploy")


async def place_each(scene: Scene) -> None:
    for call in scene.calls:
        await scene.dispatch(call)


async def nothing_more(scene: Scene) -> None:
    return None


# (a) A canary aborted with one call on it and one on stable. Each instance is full with one
# call (MAX_SESSIONS, the example agent's load), so whichever version the first call is routed
# to, the second one finds that version's only worker full and goes to the other.


async def canary_50(scene: Scene) -> None:
    scene.agent("secrets", "set", "MAX_SESSIONS=1")
    scene.agent("deploy")
    (scene.folder / "GREETING.txt").write_text("v2\n")
    assert "canary v2 takes 50% of new sessions" in scene.agent("deploy", "--canary", "50")


async def place_one_per_version(scene: Scene) -> None:
    await place_each(scene)
    versions = sorted(c.job["version"] for c in scene.calls)
    assert versions == ["v1", "v2"], [c.job for c in scene.calls]


async def abort(scene: Scene) -> None:
    # It follows the rollout to its end, and says that it ended aborted (as asked: exit 0).
    out = scene.agent("canary", "abort")
    assert "canary v2 aborted: aborted by request" in out, out


async def canary_drained(scene: Scene) -> None:
    """The canary's instance drained: it took nothing new and exited once its call ended."""
    status = await scene.status()
    assert status["deployments"][0]["routing"] == {"v1": 100}, status["deployments"]
    await scene.exited("v2", "the canary's instance to exit")


# (b) Blue-green: green starts, takes every new session, and blue drains at once, with the call.
# With its smoke test: the example agent joins the smoke session's real room, speaks, and ends.


async def bluegreen(scene: Scene) -> None:
    (scene.folder / "GREETING.txt").write_text("v2\n")
    out = scene.agent("deploy", "--strategy", "bluegreen")
    assert "serves v2; blue's 1 instance(s) drain" in out, out


async def blue_drained(scene: Scene) -> None:
    await scene.exited("v1", "blue's instance to exit")


# (c) A scale-down from two instances to one: the idle one goes, the call's stays.


async def two_instances(scene: Scene) -> None:
    scene.agent("scale", "2")
    scene.agent("deploy")


async def scale_to_one(scene: Scene) -> None:
    scene.agent("scale", "1")
    [call] = scene.calls
    instances = {i["id"]: i for i in await scene.instances()}
    busy = instances.pop(call.job["instance"])
    assert busy["status"] == "ready", busy  # kept, with its call
    [idle] = instances.values()
    assert idle["status"] in ("draining", "stopped"), idle


async def busy_one_kept(scene: Scene) -> None:
    [call] = scene.calls
    await scene.exited("v1", "the idle instance to exit", but=call.job["instance"])
    [kept] = [i for i in await scene.instances() if i["status"] != "stopped"]
    assert kept["id"] == call.job["instance"] and kept["status"] == "ready", kept


# (d) `vf server` stopped (SIGTERM) and started again on the same data dir and port: the
# instance keeps running, its worker reconnects and reports the call, which goes on.


async def restart_server(scene: Scene) -> None:
    [instance] = await scene.instances()
    vf = scene.vf
    port = int(vf.url.rsplit(":", 1)[1])  # the port its workers know
    vf.stop()
    scene.vf = await asyncio.to_thread(NsVoicefleet(vf.lk, vf.data_dir, port=port).started)

    async def back() -> dict[str, Any] | Seen:
        [again] = await scene.instances()
        [job] = await scene.vf.jobs(scene.calls[0].room)
        if again["registered"] and job["state"] == "running":
            return again
        return Seen((again, job["state"], job["error"]))

    again: dict[str, Any] = await wait_for(back, 60, "the worker to report its call again")
    assert (again["id"], again["pid"]) == (instance["id"], instance["pid"])  # adopted


@dataclass(frozen=True)
class Case:
    prepare: Callable[[Scene], Awaitable[None]]
    calls: tuple[int, ...]  # utterances of each caller, at least
    operate: Callable[[Scene], Awaitable[None]]
    place: Callable[[Scene], Awaitable[None]] = place_each
    check: Callable[[Scene], Awaitable[None]] = nothing_more


CASES = {
    "canary-abort": Case(canary_50, (3, 3), abort, place_one_per_version, canary_drained),
    "bluegreen-switch": Case(serve_v1, (3,), bluegreen, check=blue_drained),
    "scale-down": Case(two_instances, (3,), scale_to_one, check=busy_one_kept),
    "server-restart": Case(serve_v1, (3,), restart_server),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_calls_in_flight_keep_their_audio_to_their_end_during(
    case: str, lk: LiveKitServer, vf: NsVoicefleet, built_agent: Path, tmp_path: Path
) -> None:
    how = CASES[case]
    if case == "server-restart":  # a server of its own: the others' keep running meanwhile
        vf = NsVoicefleet(lk, tmp_path / "vf-restart")
        await asyncio.to_thread(vf.started)
    folder = tmp_path / "voice-agent"
    shutil.copytree(built_agent, folder)
    scene = Scene(lk, vf, folder, f"inv-{case}")
    try:
        scene.agent("create", "--name", scene.name)
        await how.prepare(scene)
        calls = [scene.call(f"{case}-{i}", n) for i, n in enumerate(how.calls)]
        scene.calls = calls
        try:
            await how.place(scene)
            for call in calls:
                await wait_for(functools.partial(call.caller.events, "said"), 60, "an utterance")
            scene.began = time.monotonic()
            await how.operate(scene)
            scene.finished = time.monotonic()
            for call in calls:
                assert call.caller.proc.poll() is None, f"{call.room} ended before the operation"
            said_before = [len(c.caller.events("said")) for c in calls]
            for call in calls:
                call.caller.finish()  # 2 utterances more
            for call in calls:
                call.report = await wait_for(call.caller.report, 150, f"the end of {call.room}")
        finally:
            for call in calls:
                call.caller.stop()
        for call, before in zip(calls, said_before, strict=True):
            await kept_its_audio(scene, call, before)
        await how.check(scene)
    finally:
        await scene.delete()
        if case == "server-restart":
            scene.vf.stop()


async def kept_its_audio(scene: Scene, call: Call, said_before: int) -> None:
    report = call.report
    joined = report["joined_at"]
    print_figures(f"{scene.name}: {call.room} on {call.job['version']}", report)
    print(
        f"the operation ran {scene.began - joined:.1f}-{scene.finished - joined:.1f} s "
        f"into {call.room}"
    )
    assert [u for u in report["utterances"] if u["reply_ms"] is None] == [], report
    assert len(report["utterances"]) > said_before, "no utterance after the operation"
    since = [g for g in report["gaps"] if joined + g["at_s"] >= scene.began]
    assert since == [], report  # nothing cut out of the agent's audio from the operation on
    assert call.caller.proc.returncode == 0

    async def ended() -> dict[str, Any] | Seen:
        jobs = await scene.vf.jobs(call.room)
        done = [j for j in jobs if j["state"] in ENDED]
        return done[0] if len(jobs) == 1 and done else Seen(jobs)

    job: dict[str, Any] = await wait_for(ended, 30, f"the agent's job in {call.room} to end")
    if job["state"] == "failed":  # livekit-agents' exit-status race (tests/support.py)
        assert job["error"] == NO_REASON, job
    else:
        assert job["state"] == "succeeded", job
    assert (job["version"], job["instance"]) == (call.job["version"], call.job["instance"]), job
    heard = [
        json.loads(line)["utterances"]
        for log in (scene.vf.data_dir / "logs").glob("*/*.log")
        for line in log.read_text(errors="replace").splitlines()
        if '"message": "call done"' in line and f'"room": "{call.room}"' in line
    ]
    # The agent heard every utterance: one "call done" line counting at least as many as were
    # said (on a loaded machine its VAD, slower than real time, may hear one as two).
    assert len(heard) == 1 and heard[0] >= len(report["utterances"]), heard
