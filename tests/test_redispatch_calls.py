"""A worker killed with `kill -9` mid-call, with a real LiveKit server and a real caller.

voicefleet dispatches the call's job again to another worker (LiveKit's JRP_ON_FAILURE, which
LiveKit's own server does not do): the same job, in the same room, with the same participant
identity, so the new agent takes the dead one's place and greets the caller again. The caller's
report says when it heard the agent again after the kill: printed (run with -s), not asserted.
The rig is tests/test_calls.py's (see its docstring)."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from livekit import api

from tests.livekit import (
    Caller,
    LiveKitServer,
    NsVoicefleet,
    print_figures,
    server_built,
    vf_agent,
)
from tests.support import DEV_KEY, DEV_SECRET, wait_for

pytestmark = pytest.mark.timeout(300 if server_built() else 1800)


async def serving(vf: NsVoicefleet, name: str, count: int) -> list[dict[str, Any]]:
    """Wait until `count` instances of agent `name` are ready and registered; return them."""

    async def ready() -> list[dict[str, Any]] | None:
        status = await vf.request("GET", f"/api/v1/agents/{name}")
        found = [i for i in status["instances"] if i["status"] == "ready" and i["registered"]]
        return found if len(found) >= count else None

    return await wait_for(ready, 120, f"{count} instances of {name} serving")


@pytest.mark.parametrize("through", ["voicefleet", "livekit"])
async def test_a_worker_killed_mid_call_is_replaced_in_the_same_room_and_the_caller_hears_it(
    through: str, lk: LiveKitServer, vf: NsVoicefleet, built_agent: Path, tmp_path: Path
) -> None:
    """Dispatched through voicefleet (it mints the new agent's room token) or through LiveKit
    (gateway: the new agent joins with the token LiveKit assigned the job with)."""
    folder = tmp_path / "voice-agent"
    shutil.copytree(built_agent, folder)
    name = f"kill-via-{through}"
    vf_agent(folder, vf.url, "create", "--name", name, ns=lk)
    vf_agent(folder, vf.url, "deploy", ns=lk)
    vf_agent(folder, vf.url, "scale", "2", ns=lk)  # one to die, one to take over
    await serving(vf, name, 2)

    room = f"killed-via-{through}"
    caller = Caller(lk, room, tmp_path, "--utterances", "3", until=True)
    try:
        await wait_for(caller.joined, 60, "the caller to join the room")

        async def dispatch() -> api.AgentDispatch:
            client = api.LiveKitAPI(vf.url, DEV_KEY, DEV_SECRET)
            try:
                return await client.agent_dispatch.create_dispatch(
                    api.CreateAgentDispatchRequest(agent_name=name, room=room)
                )
            finally:
                await client.aclose()

        if through == "voicefleet":
            await lk.ns.call(dispatch)
        else:
            await wait_for(
                lambda: any(
                    e.get("agentName") == name for e in lk.log_entries("worker registered")
                ),
                60,
                "voicefleet to register with LiveKit for the agent",
            )
            request = api.CreateAgentDispatchRequest(agent_name=name, room=room)
            await lk.call(lambda c: c.agent_dispatch.create_dispatch(request))
        await wait_for(lambda: caller.events("said"), 60, "the caller's first utterance")
        [job] = await vf.jobs(room)
        assert job["state"] == "running", job
        status = await vf.request("GET", f"/api/v1/agents/{name}")
        [doomed] = [i for i in status["instances"] if i["id"] == job["instance"]]

        killed = time.monotonic()
        os.kill(doomed["pid"], signal.SIGKILL)  # the worker's main process, as a crash would

        async def moved() -> dict[str, Any] | None:
            [again] = await vf.jobs(room)
            if again["redispatches"] == 1 and again["state"] == "running":
                return again
            return None

        again = await wait_for(moved, 60, "the job to run again on the other instance")
        assert again["id"] == job["id"] and again["instance"] != doomed["id"], again
        assert caller.proc.poll() is None, "the call ended before the agent came back"
        await wait_for(lambda: len(caller.events("track")) == 2, 60, "the new agent's track")
        caller.finish()  # 2 utterances more, for the new agent to answer
        report = await wait_for(caller.report, 150, "the call to end and the caller's report")
    finally:
        caller.stop()

    print_figures(f"a worker killed mid-call, via {through}", report)
    joined = report["joined_at"]
    # The new agent publishes a track of its own: the first loud frame on it.
    starts = sorted(report["track_starts"].values())
    assert len(starts) == 2, f"not one agent track before the kill and one after: {report}"
    back = starts[1]
    assert joined + back > killed, report
    print(
        f"killed {killed - joined:.1f} s into the call; "
        f"the new agent heard {joined + back - killed:.2f} s later"
    )
    # Every utterance that ended once the new agent was there got its answer.
    late = [u for u in report["utterances"] if u["end_s"] > back]
    assert late and all(u["reply_ms"] is not None for u in late), report

    # The caller left: the job ends (through LiveKit, LiveKit may end it first, closing the
    # room: terminated), once, as the one job it always was.
    [ended] = await wait_for(lambda: _ended(vf, room), 60, "the job to end after the caller left")
    assert ended["redispatches"] == 1, ended
    assert ended["state"] in ("succeeded", "terminated"), ended


async def _ended(vf: NsVoicefleet, room: str) -> list[dict[str, Any]] | None:
    jobs = await vf.jobs(room)
    ended = ("succeeded", "failed", "terminated")
    return jobs if all(j["state"] in ended for j in jobs) else None
