"""marker_agent (tests/agents/marker_agent.py), registered for the job type WORKER_TYPE names:
ROOM (the default), PUBLISHER or PARTICIPANT. Besides marker_agent's files, each job writes
`<job id>.typed` (JSON): its job type and the participant it is for (publisher and participant
jobs are about one participant of the room).

livekit-agents 1.8.9's `WorkerType` has ROOM and PUBLISHER only. The worker puts
`worker_type.value` in its register message and nowhere else, so PARTICIPANT is a stand-in with
that one attribute: the job type LiveKit's protocol and server have, which the SDK does not name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, cast

from livekit.agents import JobContext, WorkerOptions, WorkerType, cli
from livekit.protocol import agent
from marker_agent import MARKER_DIR, entrypoint, load, request


@dataclass(frozen=True)
class JobTypeStandIn:
    value: int


WORKER_TYPES: dict[str, Any] = {
    "ROOM": WorkerType.ROOM,
    "PUBLISHER": WorkerType.PUBLISHER,
    "PARTICIPANT": JobTypeStandIn(agent.JobType.JT_PARTICIPANT),
}


async def typed_entrypoint(ctx: JobContext) -> None:
    job = ctx.job
    (MARKER_DIR / f"{job.id}.typed").write_text(
        json.dumps(
            {
                "job_id": job.id,
                "type": agent.JobType.Name(job.type),
                "room": job.room.name,
                "participant": job.participant.identity if job.HasField("participant") else "",
            }
        )
    )
    await entrypoint(ctx)


if __name__ == "__main__":
    cli.run_app(
        WorkerOptions(
            entrypoint_fnc=typed_entrypoint,
            request_fnc=request,
            load_fnc=load,
            load_threshold=0.99,
            agent_name=os.environ.get("AGENT_NAME", "typed"),
            worker_type=cast(WorkerType, WORKER_TYPES[os.environ.get("WORKER_TYPE", "ROOM")]),
            num_idle_processes=1,
            port=0,
            drain_timeout=120,
        )
    )
