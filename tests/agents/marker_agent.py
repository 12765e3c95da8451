"""A real livekit-agents worker for the tests: it leaves a marker file for every job it runs.

Driven by environment variables so that one file covers every test:
  MARKER_DIR     where `<job id>.started` (JSON) and `<job id>.done` are written
  AGENT_NAME     the agent name it registers with (explicit dispatch)
  REJECT_JOBS=1  its request_fnc declines every job (not available: the server tries another)
  REJECT_JOBS=terminate  its request_fnc rejects every job for good (reject()'s default)
  MAX_JOBS       it reports FULL once it runs this many jobs (default 8)
A job's metadata may be JSON {"hold": seconds}: the entrypoint waits that long, then ends the
job with ctx.shutdown(). With {"until_released": true} it then also waits for the test to write
`<job id>.release` (tests.support.release): a call in flight for exactly as long as a test needs.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from livekit.agents import JobContext, JobRequest, WorkerOptions, cli

MARKER_DIR = Path(os.environ["MARKER_DIR"])
MAX_JOBS = int(os.environ.get("MAX_JOBS", "8"))


async def request(req: JobRequest) -> None:
    reject = os.environ.get("REJECT_JOBS")
    if reject == "1":
        await req.reject(terminate=False)
    elif reject == "terminate":
        await req.reject()
    else:
        await req.accept(identity=f"agent-{req.job.id}")


def load(worker: object) -> float:
    # Jobs, not CPU: the tests' machines are shared, so CPU load would make "full" random.
    return min(len(worker.active_jobs) / MAX_JOBS, 1.0)  # type: ignore[attr-defined]


async def appears(path: Path) -> None:
    # The test's process writes it: there is nothing to await but the file itself.
    while True:
        if path.exists():
            return
        await asyncio.sleep(0.05)


async def entrypoint(ctx: JobContext) -> None:
    job = ctx.job
    options = json.loads(job.metadata or "{}")
    hold = float(options.get("hold", 0))
    (MARKER_DIR / f"{job.id}.started").write_text(
        json.dumps(
            {
                "job_id": job.id,
                "dispatch_id": job.dispatch_id,
                "room": job.room.name,
                "metadata": job.metadata,
                "worker_pgid": os.getpgid(0),
                "url": ctx._info.url,
                "token": ctx._info.token,
            }
        )
    )
    await asyncio.sleep(hold)
    if options.get("until_released"):
        await appears(MARKER_DIR / f"{job.id}.release")
    (MARKER_DIR / f"{job.id}.done").write_text("done")
    ctx.shutdown("done")


if __name__ == "__main__":
    cli.run_app(
        WorkerOptions(
            entrypoint_fnc=entrypoint,
            request_fnc=request,
            load_fnc=load,
            load_threshold=0.99,
            agent_name=os.environ.get("AGENT_NAME", "marker"),
            num_idle_processes=1,
            port=0,
            drain_timeout=120,
        )
    )
