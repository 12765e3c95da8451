"""Real calls through a real livekit-server, measured by the caller simulator.

    .venv/bin/python benchmarks/livekit/calls.py [--calls 5] [--concurrent 1] [--utterances 4]
                                                 [--through voicefleet,livekit]

Starts, inside a network namespace of its own (tests/livekit.py; needs the rights to make one,
as the tests do): livekit-server (scripts/peers builds it once), `vf server --dev --livekit-url …`
and the example agent (examples/voice_agent) as one worker registered with voicefleet. Then, for
each dispatch path, `--calls` calls of tests/caller.py (`--concurrent` at a time): each caller
joins its room, the agent is dispatched to it through voicefleet's AgentDispatchService
("voicefleet": standalone dispatch, voicefleet signs the room token with the SFU's key) or the
LiveKit server's ("livekit": gateway mode, LiveKit assigns the job to voicefleet), and the
caller speaks `--utterances` utterances from examples/voice_agent/speech.wav.

Per call and per path (p50 / p90 / max): join -> first agent audio (the agent's greeting: the
dispatch, the job starting, the agent joining and publishing), utterance end -> reply start
(includes the VAD's 550 ms of silence that ends an utterance), and every gap > 100 ms in the
agent's audio while it speaks.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from livekit import api  # noqa: E402

from tests.livekit import VOICE_AGENT as AGENT  # noqa: E402
from tests.livekit import (  # noqa: E402
    Caller,
    LiveKitServer,
    NsVoicefleet,
    NsWorker,
    livekit_server,
)
from tests.support import DEV_KEY, DEV_SECRET, wait_for  # noqa: E402
from tests.test_calls import AGENT_NAME  # noqa: E402


async def one_call(
    lk: LiveKitServer, vf: NsVoicefleet, through: str, room: str, folder: Path, utterances: int
) -> dict[str, Any]:
    caller = Caller(lk, room, folder, "--utterances", str(utterances))
    try:
        await wait_for(caller.joined, 60, f"the caller of {room} to join")
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
            await lk.call(lambda c: c.agent_dispatch.create_dispatch(request))
        report: dict[str, Any] = await wait_for(caller.report, 60 + 10 * utterances, room)
        return report
    finally:
        caller.stop()


def spread(values: list[float | None]) -> str:
    ordered = sorted(v for v in values if v is not None)
    if not ordered:
        return "-"
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return f"{statistics.median(ordered):.0f} / {p90:.0f} / {ordered[-1]:.0f} ms"


async def run(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="voicefleet-calls-"))
    print(f"logs in {work}")
    with livekit_server(work / "livekit") as lk:
        vf = NsVoicefleet(lk, work / "voicefleet").started()
        worker = NsWorker(
            lk,
            AGENT,
            work / "agent.log",
            {
                "LIVEKIT_URL": vf.url.replace("http://", "ws://"),
                "LIVEKIT_API_KEY": DEV_KEY,
                "LIVEKIT_API_SECRET": DEV_SECRET,
                "LIVEKIT_AGENT_NAME_OVERRIDE": AGENT_NAME,
            },
        )
        try:
            await wait_for(worker.registered, 90, "the voice agent to register")
            await wait_for(
                lambda: any(
                    e.get("agentName") == AGENT_NAME for e in lk.log_entries("worker registered")
                ),
                30,
                "voicefleet to register with LiveKit",
            )
            limit = asyncio.Semaphore(args.concurrent)

            async def limited(through: str, n: int) -> dict[str, Any]:
                async with limit:
                    return await one_call(
                        lk, vf, through, f"bench-{through}-{n}", work, args.utterances
                    )

            for through in args.through.split(","):
                reports = await asyncio.gather(*(limited(through, n) for n in range(args.calls)))
                print(f"\n== through {through}: {args.calls} calls, {args.concurrent} at a time")
                for r in reports:
                    replies = [u["reply_ms"] for u in r["utterances"]]
                    gaps = [g["ms"] for g in r["gaps"]]
                    print(
                        f"{r['room']}: join {r['join_ms']} ms, first audio "
                        f"{r['join_to_first_audio_ms']} ms, replies {replies}, gaps {gaps}, "
                        f"stalls {[s['ms'] for s in r['stalls']]}, late {r['late_ms']} ms"
                    )
                firsts = [r["join_to_first_audio_ms"] for r in reports]
                replies = [u["reply_ms"] for r in reports for u in r["utterances"]]
                gaps = [g["ms"] for r in reports for g in r["gaps"]]
                print(f"join -> first agent audio (p50 / p90 / max): {spread(firsts)}")
                print(f"utterance end -> reply    (p50 / p90 / max): {spread(replies)}")
                unanswered = sum(1 for r in replies if r is None)
                print(f"unanswered utterances: {unanswered} of {len(replies)}")
                print(f"gaps > 100 ms while the agent spoke: {len(gaps)} {gaps}")
        finally:
            worker.stop()
            vf.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--concurrent", type=int, default=1)
    parser.add_argument("--utterances", type=int, default=4)
    parser.add_argument("--through", default="voicefleet,livekit")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
