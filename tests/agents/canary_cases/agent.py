"""An agent whose sessions go wrong in the ways a canary, a smoke test or the autoscaler must
judge, for tests/test_rollouts.py and tests/test_autoscale.py (deployed like
tests/agents/deployable).

MARKER_DIR (a secret, as a user's would be) gets `<job id>.started` and `.done`. Files next to it
change it per version; a job's metadata (JSON) changes one session:
  RAISE              every session's entrypoint raises RuntimeError(<the file's text>)
  ERROR_LINES        every session logs that many ERROR lines, then ends normally
  SHORT              every session ends at once, whatever its "hold"
  {"hold": s}        the session lasts s seconds
  {"until_released": true}  ...and then until the test writes `<job id>.release`
  {"raise": "text"}  this session's entrypoint raises RuntimeError("text")
  {"exit": 1}        this session's process dies (os._exit): a crashed job process
Load is by sessions (LOAD_SESSIONS at 1.0, FULL at LOAD_THRESHOLD), as in the deployable agent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

from livekit.agents import JobContext, WorkerOptions, cli

HERE = Path(__file__).parent
SESSIONS_AT_FULL_LOAD = float(os.environ.get("LOAD_SESSIONS", "50"))
LOAD_THRESHOLD = float(os.environ.get("LOAD_THRESHOLD", "0.99"))
log = logging.getLogger("canary-cases")


def load(worker: object) -> float:
    return min(len(worker.active_jobs) / SESSIONS_AT_FULL_LOAD, 1.0)  # type: ignore[attr-defined]


def setting(name: str) -> str | None:
    path = HERE / name
    return path.read_text().strip() if path.exists() else None


async def appears(path: Path) -> None:
    # The test's process writes it: there is nothing to await but the file itself.
    while True:
        if path.exists():
            return
        await asyncio.sleep(0.05)


async def entrypoint(ctx: JobContext) -> None:
    markers = Path(os.environ["MARKER_DIR"])
    meta = json.loads(ctx.job.metadata or "{}")
    (markers / f"{ctx.job.id}.started").write_text(
        json.dumps({"job_id": ctx.job.id, "version": os.environ.get("VOICEFLEET_VERSION", "")})
    )
    if (broken := setting("RAISE")) is not None:
        raise RuntimeError(broken)
    if "raise" in meta:
        raise RuntimeError(meta["raise"])
    if "exit" in meta:
        os._exit(int(meta["exit"]))
    for _ in range(int(setting("ERROR_LINES") or 0)):
        log.error("could not reach the speech service")
    if setting("SHORT") is None:
        await asyncio.sleep(float(meta.get("hold", 0)))
        if meta.get("until_released"):
            await appears(markers / f"{ctx.job.id}.release")  # tests.support.release
    (markers / f"{ctx.job.id}.done").write_text("done")
    ctx.shutdown("done")


if __name__ == "__main__":
    cli.run_app(
        WorkerOptions(entrypoint_fnc=entrypoint, load_fnc=load, load_threshold=LOAD_THRESHOLD)
    )
