"""The agent the deploy tests ship with `vf agent deploy`: plain livekit-agents, no port set.

Its settings come the way a user's secrets do, as environment variables: MARKER_DIR (where
`<job id>.started` / `.done` go) and VF_TEST_SECRET (copied into the marker to prove secrets
arrive). The job's metadata may be {"hold": seconds}. CRASH_AT_IMPORT=1 makes it fail to start.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from livekit.agents import JobContext, WorkerOptions, cli

if Path(__file__).with_name("CRASH").exists():
    raise SystemExit("this version is broken on purpose")

VERSION_FILE = Path(__file__).with_name("VERSION")


def load(worker: object) -> float:
    # Jobs, not CPU: shared test machines would make a CPU-based "full" random.
    return min(len(worker.active_jobs) / 50, 1.0)  # type: ignore[attr-defined]


async def entrypoint(ctx: JobContext) -> None:
    markers = Path(os.environ["MARKER_DIR"])
    hold = float(json.loads(ctx.job.metadata or "{}").get("hold", 0))
    (markers / f"{ctx.job.id}.started").write_text(
        json.dumps(
            {
                "job_id": ctx.job.id,
                "source": VERSION_FILE.read_text().strip() if VERSION_FILE.exists() else "",
                "version": os.environ.get("VOICEFLEET_VERSION", ""),
                "instance": os.environ.get("VOICEFLEET_INSTANCE_ID", ""),
                "secret": os.environ.get("VF_TEST_SECRET", ""),
            }
        )
    )
    await asyncio.sleep(hold)
    (markers / f"{ctx.job.id}.done").write_text("done")
    ctx.shutdown("done")


if __name__ == "__main__":
    cli.run_app(WorkerOptions(entrypoint_fnc=entrypoint, load_fnc=load, load_threshold=0.99))
