"""An agent whose sessions end the way each job's metadata says: plain livekit-agents, no port set.

tests/test_outcomes.py deploys it with `vf agent deploy`, and runs it unmanaged too (`python
agent.py start`; LIVEKIT_AGENT_NAME names it, HEALTH_PORT sets its port). Each session first
writes `<job id>.started` in MARKER_DIR, then ends the way its metadata's "end" says:
  "raise"    the entrypoint raises RuntimeError("v2 is broken")
  "sigkill"  its job process kills itself with SIGKILL
  "exit"     its job process exits with code 3
  "ok"       (or no metadata) it ends cleanly with ctx.shutdown()
after {"hold": seconds} (default 0).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

from livekit.agents import JobContext, WorkerOptions, cli


def load(worker: object) -> float:
    # Sessions, not CPU: on a shared test machine a CPU-based "full" would come and go.
    return min(len(worker.active_jobs) / 50, 1.0)  # type: ignore[attr-defined]


async def entrypoint(ctx: JobContext) -> None:
    how = json.loads(ctx.job.metadata or "{}")
    end = how.get("end", "ok")
    marker = Path(os.environ["MARKER_DIR"]) / f"{ctx.job.id}.started"
    marker.write_text(json.dumps({"job_id": ctx.job.id, "end": end, "pid": os.getpid()}))
    await asyncio.sleep(float(how.get("hold", 0)))
    if end == "raise":
        raise RuntimeError("v2 is broken")
    if end == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if end == "exit":
        os._exit(3)
    ctx.shutdown("done")


if __name__ == "__main__":
    port = os.environ.get("HEALTH_PORT")
    cli.run_app(
        WorkerOptions(
            entrypoint_fnc=entrypoint,
            load_fnc=load,
            load_threshold=0.99,
            num_idle_processes=1,
            **({"port": int(port)} if port else {}),
        )
    )
