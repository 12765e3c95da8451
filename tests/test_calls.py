"""Real calls: a simulated caller (tests/caller.py) speaks to the example voice agent
(examples/voice_agent) through a real livekit-server, with voicefleet dispatching the agent.

Everything runs inside the rig's network namespace (tests/livekit.py): livekit-server, `vf server
--dev --livekit-url … --livekit-api-key … --livekit-api-secret …` (voicefleet knows the SFU: it
signs room tokens with its key, and in gateway mode registers with it), the agent's worker and
the caller. In the answering tests the agent runs as an unmanaged worker registered with
voicefleet (`python agent.py start`, the venv's livekit-agents and livekit-plugins-silero); in the
deploy and rollback tests it is deployed with `vf agent deploy` inside the namespace, from an
environment a throwaway server outside it built first into the shared env cache (a build inside
the namespace cannot reach PyPI). The figures each call measured are printed (run
with -s), not asserted. Skipped, saying why, only when livekit-server cannot be built here."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from livekit import api

from tests.caller import Heard, Spoken, analyse, split_utterances
from tests.livekit import (
    VOICE_AGENT,
    Caller,
    LiveKitServer,
    NsVoicefleet,
    NsWorker,
    print_figures,
    server_built,
    vf_agent,
)
from tests.support import DEV_KEY, DEV_SECRET, NO_REASON, wait_for

AGENT = VOICE_AGENT
AGENT_NAME = "call-agent"
UTTERANCES = 4

pytestmark = pytest.mark.timeout(300 if server_built() else 1800)


# -- the caller's arithmetic, in-process -------------------------------------------------------


def test_the_callers_report_finds_each_reply_and_every_hole_in_the_agents_speech() -> None:
    """A scripted call, one 10 ms frame of the agent's track every 10 ms from 0.5 s: greeting
    at 1.0-1.5 s, utterances ending at 3 s and 6 s, answers from 3.6 s (with a 200 ms hole at
    4.0 s) and from 6.5 s; the silence between is no gap. The frames of 5.0-5.3 s reach the
    caller late, all at once (a busy caller): a stall, not a gap in what plays."""
    loud = [(1.0, 1.5), (3.6, 4.0), (4.2, 4.4), (6.5, 7.3)]

    def frame(i: int) -> Heard:
        t = round(0.5 + i * 0.01, 2)
        rms = 5000.0 if any(a <= t < b for a, b in loud) else 3.0
        return Heard(5.3 if 5.0 <= t < 5.3 else t, 0.01, rms)

    heard = [frame(i) for i in range(700)]
    spoken = [Spoken(2.0, 3.0), Spoken(5.0, 6.0)]
    report = analyse("r", 0.0, 0.5, spoken, heard)
    assert report.join_ms == 500.0 and report.join_to_first_audio_ms == 500.0
    assert [(u.end_s, u.reply_ms) for u in report.utterances] == [(2.5, 600.0), (5.5, 500.0)]
    assert [(g.at_s, g.ms) for g in report.gaps] == [(3.49, 200.0)]
    assert [(s.at_s, s.ms) for s in report.stalls] == [(4.49, 310.0)]
    assert report.answered and report.late_ms == 0.0

    unanswered = analyse("r", 0.0, 0.5, spoken, heard[:100])
    assert [u.reply_ms for u in unanswered.utterances] == [None, None]
    assert not unanswered.answered


def test_the_bundled_speech_is_cut_into_utterances_at_its_pauses() -> None:
    rate = 16_000
    beep = (8000 * np.sin(np.arange(rate // 2) / 3)).astype(np.int16)
    pcm = np.concatenate([np.zeros(rate // 5), beep, np.zeros(rate // 2), beep, np.zeros(800)])
    pieces = split_utterances(pcm.astype(np.int16), rate)
    assert [len(p) for p in pieces] == [len(beep), len(beep)]


# -- real calls ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def agent(
    lk: LiveKitServer, vf: NsVoicefleet, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NsWorker]:
    """The example voice agent, one worker registered with voicefleet (not with LiveKit)."""
    log = tmp_path_factory.mktemp("agent") / "worker.log"
    worker = NsWorker(
        lk,
        AGENT,
        log,
        {
            "LIVEKIT_URL": vf.url.replace("http://", "ws://"),
            "LIVEKIT_API_KEY": DEV_KEY,
            "LIVEKIT_API_SECRET": DEV_SECRET,
            "LIVEKIT_AGENT_NAME_OVERRIDE": AGENT_NAME,
        },
    )
    print(f"voice agent worker log: {log}")
    try:
        yield worker
    finally:
        worker.stop()


@pytest.mark.parametrize("through", ["voicefleet", "livekit"])
async def test_a_caller_speaks_and_the_voice_agent_answers_every_utterance_until_it_hangs_up(
    through: str, lk: LiveKitServer, vf: NsVoicefleet, agent: NsWorker, tmp_path: Path
) -> None:
    """The caller joins, then the agent is dispatched to its room: through voicefleet's own
    AgentDispatchService (standalone dispatch; voicefleet mints the room token with the SFU's
    key) or through the LiveKit server's (gateway: LiveKit assigns the job to voicefleet, which
    passes LiveKit's token on). The agent greets, answers each of the caller's utterances
    with audio the caller hears, and its job ends when the caller leaves."""
    await wait_for(agent.registered, 90, "the voice agent to register with voicefleet")
    room = f"call-through-{through}"
    caller = Caller(lk, room, tmp_path, "--utterances", str(UTTERANCES))
    try:
        await wait_for(caller.joined, 60, "the caller to join the room")
        request = api.CreateAgentDispatchRequest(agent_name=AGENT_NAME, room=room)
        if through == "voicefleet":

            async def dispatch() -> api.AgentDispatch:
                client = api.LiveKitAPI(vf.url, DEV_KEY, DEV_SECRET)
                try:
                    return await client.agent_dispatch.create_dispatch(request)
                finally:
                    await client.aclose()

            await lk.ns.call(dispatch)
        else:
            await wait_for(
                lambda: any(
                    e.get("agentName") == AGENT_NAME for e in lk.log_entries("worker registered")
                ),
                30,
                "voicefleet to register with LiveKit for the agent",
            )
            await lk.call(lambda c: c.agent_dispatch.create_dispatch(request))

        report = await wait_for(caller.report, 150, "the call to end and the caller's report")
    finally:
        caller.stop()
    print_figures(through, report)
    assert report["join_to_first_audio_ms"] is not None, report  # the greeting was heard
    assert len(report["utterances"]) == UTTERANCES, report
    unanswered = [u for u in report["utterances"] if u["reply_ms"] is None]
    assert not unanswered, report
    assert caller.proc.returncode == 0

    # The caller left: the agent's job ends (its entrypoint shuts down on the caller leaving;
    # through LiveKit, LiveKit may end it first, closing the room the caller left: terminated).
    async def ended() -> dict[str, Any] | None:
        jobs = await vf.jobs(room)
        return next((j for j in jobs if j["state"] in ("succeeded", "failed", "terminated")), None)

    job: dict[str, Any] = await wait_for(ended, 30, "the agent's job to end after the caller left")
    if job["state"] == "failed":
        assert job["error"] == NO_REASON, job  # livekit-agents' exit-status race (support.py)
    done = [
        json.loads(line)
        for line in agent.log().splitlines()
        if '"message": "call done"' in line and f'"room": "{room}"' in line
    ]
    # The agent heard each one (at least: under load its VAD may hear one utterance as two).
    assert len(done) == 1 and done[0]["utterances"] >= UTTERANCES, done


# -- a rolling deploy during a call ----------------------------------------------------------


@pytest.mark.parametrize("operation", ["deploy", "rollback"])
async def test_a_rolling_deploy_or_a_rollback_during_a_call_keeps_the_calls_audio_to_its_end(
    operation: str, lk: LiveKitServer, vf: NsVoicefleet, built_agent: Path, tmp_path: Path
) -> None:
    """The example agent deployed with `vf agent deploy` serves a call: on v1, and v2 is
    deployed while the caller speaks; or on v2, and `vf agent rollback` goes back to v1 while
    the caller speaks. The call stays on its version to its end: every utterance, before and
    after the operation, is answered, and no gap opens in the agent's audio while it runs."""
    folder = tmp_path / "voice-agent"
    shutil.copytree(built_agent, folder)
    name = f"call-{operation}"
    vf_agent(folder, vf.url, "create", "--name", name, ns=lk)
    first = vf_agent(folder, vf.url, "deploy", ns=lk)
    assert "reused cached environment" in first.stdout, first.stdout  # no PyPI in here
    (folder / "GREETING.txt").write_text("v2\n")
    if operation == "rollback":
        vf_agent(folder, vf.url, "deploy", ns=lk)
    serving, expected = {
        "deploy": ("v1", "deploy to v2: complete"),
        "rollback": ("v2", "rollback to v1: complete"),
    }[operation]

    room = f"call-during-{operation}"
    caller = Caller(lk, room, tmp_path, until=True)
    try:
        await wait_for(caller.joined, 60, "the caller to join the room")
        request = api.CreateAgentDispatchRequest(agent_name=name, room=room)

        async def dispatch() -> api.AgentDispatch:
            client = api.LiveKitAPI(vf.url, DEV_KEY, DEV_SECRET)
            try:
                return await client.agent_dispatch.create_dispatch(request)
            finally:
                await client.aclose()

        await lk.ns.call(dispatch)
        await wait_for(lambda: caller.events("said"), 60, "the caller's first utterance")

        began = time.monotonic()
        done = await asyncio.to_thread(vf_agent, folder, vf.url, operation, ns=lk)
        finished = time.monotonic()
        assert expected in done.stdout, done.stdout
        assert caller.proc.poll() is None, f"the call ended before the {operation} did"
        said_before = len(caller.events("said"))
        caller.finish()  # 2 utterances more, on the same version

        report = await wait_for(caller.report, 150, "the call to end and the caller's report")
    finally:
        caller.stop()
    print_figures(f"{operation} during the call", report)
    joined = report["joined_at"]
    print(f"the {operation} ran {began - joined:.1f}-{finished - joined:.1f} s into the call")
    assert [u for u in report["utterances"] if u["reply_ms"] is None] == [], report
    assert len(report["utterances"]) > said_before, f"no utterance after the {operation}"
    during = [g for g in report["gaps"] if began <= joined + g["at_s"] <= finished]
    assert during == [], report  # the operation cut nothing out of the agent's audio

    jobs = await vf.jobs(room)
    assert [j["version"] for j in jobs] == [serving], jobs  # one version from start to end
