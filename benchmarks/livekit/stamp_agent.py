"""A livekit-agents worker for dispatch benchmarks: it notes when each job reached it, then the
job ends at once.

Its jobs never join their room. Per job it appends two JSON lines to $STAMP_FILE (one file per
worker; times are unix seconds, `time.time()`, one clock for every process on the machine):

- `"kind": "assigned"`, written the moment the server's JobAssignment arrives on the worker's
  connection (the worker "has its job"): the job's ids, room and metadata, `received_at` (its
  availability request, i.e. the offer, arrived), `accepted_at` (the request handler accepted)
  and `assigned_at`;
- `"kind": "entered"`, from the entrypoint once the job runs (`entered_at`), which then calls
  `ctx.shutdown()`.

The assignment is noted in the worker's message handler, not in the entrypoint: between the two,
livekit-agents hands the job to an executor from its pool, and under a burst that pool, not the
dispatch path, sets the pace (the benchmark reports both). The two handlers are wrapped here for
that: livekit-agents 1.8.9's `AgentServer._handle_availability` and `_handle_assignment`.

Jobs run in threads of the worker's own process (`JobExecutorType.THREAD`), not in a process
each, so that a burst of hundreds costs the worker as little as livekit-agents allows; it is
never full.

Environment: STAMP_FILE (required), AGENT_NAME (default "bench"), IDLE_EXECUTORS (warm
executors kept, default 16), and LiveKit's LIVEKIT_URL /
LIVEKIT_API_KEY / LIVEKIT_API_SECRET (the server it registers with).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import livekit.agents.worker as lk_worker
from livekit.agents import JobContext, JobExecutorType, JobRequest, WorkerOptions, cli

_fd = os.open(os.environ["STAMP_FILE"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
_offered: dict[str, float] = {}  # job id -> when its availability request arrived
_accepted: dict[str, float] = {}  # job id -> when the request handler accepted it


def _write(line: dict[str, Any]) -> None:
    # One write of a short line to an O_APPEND file: lines never interleave.
    os.write(_fd, (json.dumps(line) + "\n").encode())


_on_availability = lk_worker.AgentServer._handle_availability
_on_assignment = lk_worker.AgentServer._handle_assignment


def _handle_availability(self: Any, msg: Any) -> None:
    _offered[msg.job.id] = time.time()
    _on_availability(self, msg)


def _handle_assignment(self: Any, assignment: Any) -> None:
    now = time.time()
    job = assignment.job
    _write(
        {
            "kind": "assigned",
            "job_id": job.id,
            "dispatch_id": job.dispatch_id,
            "room": job.room.name,
            "metadata": job.metadata,
            "received_at": _offered.pop(job.id, 0.0),
            "accepted_at": _accepted.pop(job.id, 0.0),
            "assigned_at": now,
        }
    )
    _on_assignment(self, assignment)


lk_worker.AgentServer._handle_availability = _handle_availability  # type: ignore[method-assign]
lk_worker.AgentServer._handle_assignment = _handle_assignment  # type: ignore[method-assign]


async def request(req: JobRequest) -> None:
    _accepted[req.job.id] = time.time()
    await req.accept(identity=f"agent-{req.job.id}")


def load(worker: object) -> float:
    return 0.0


async def entrypoint(ctx: JobContext) -> None:
    _write(
        {
            "kind": "entered",
            "job_id": ctx.job.id,
            "metadata": ctx.job.metadata,
            "entered_at": time.time(),
        }
    )
    ctx.shutdown("stamped")


if __name__ == "__main__":
    cli.run_app(
        WorkerOptions(
            entrypoint_fnc=entrypoint,
            request_fnc=request,
            load_fnc=load,
            # Never full, however many requests arrive at once: with a finite threshold,
            # livekit-agents counts each request being answered as a share of it and refuses
            # a burst's 5th request on an idle worker.
            load_threshold=math.inf,
            job_executor_type=JobExecutorType.THREAD,
            # Warm executors for a burst: livekit-agents 1.8.9's pool (ipc/proc_pool.py,
            # _acquire_proc) can give up on a job when many wait for an executor at once
            # ("failed to acquire process for job after 3 attempts"); the job is then never
            # started, and never reported failed either.
            num_idle_processes=int(os.environ.get("IDLE_EXECUTORS", "16")),
            port=0,  # its health server on any free port: several workers share one host
            agent_name=os.environ.get("AGENT_NAME", "bench"),
        )
    )
