"""The agent the deploy tests ship with `vf agent deploy`: plain livekit-agents, no port set.

Its settings come the way a user's secrets do, as environment variables: MARKER_DIR (where
`<job id>.started` / `.done` go) and VF_TEST_SECRET (copied into the marker to prove secrets
arrive). At start each instance writes `boot-<instance id>.json` there: the secret it sees and
its file secrets (`--secret-mount`), as read from $VOICEFLEET_SECRETS_DIR.
The job's metadata may be {"hold": seconds} and {"until_released": true} (then it ends
once the test writes `<job id>.release`). Files next to it change it per version:
CRASH makes it fail to start (so does the variable CRASH_AT_START, per instance), FAIL makes
every session's process die (after `.started`), THREADS runs jobs in threads instead of
processes (cheap jobs, for tests that dispatch hundreds).
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from livekit.agents import JobContext, JobExecutorType, WorkerOptions, cli

if Path(__file__).with_name("CRASH").exists() or os.environ.get("CRASH_AT_START"):
    raise SystemExit("this version is broken on purpose")

HERE = Path(__file__).parent
VERSION_FILE = HERE / "VERSION"


# Load by sessions, not CPU: shared test machines would make a CPU-based "full" random.
# LOAD_SESSIONS is how many sessions make load 1.0; the worker is FULL at LOAD_THRESHOLD.
SESSIONS_AT_FULL_LOAD = float(os.environ.get("LOAD_SESSIONS", "50"))
LOAD_THRESHOLD = float(os.environ.get("LOAD_THRESHOLD", "0.99"))


def load(worker: object) -> float:
    return min(len(worker.active_jobs) / SESSIONS_AT_FULL_LOAD, 1.0)  # type: ignore[attr-defined]


try:  # voicefleet.sdk is on the PYTHONPATH of the instances voicefleet runs
    from voicefleet.sdk import Session, flags

    flags()  # connect at start, before the first session asks
except ImportError:
    flags = None  # type: ignore[assignment]


def flag(key: str, ctx: JobContext) -> object:
    """A live feature flag for this session."""
    if flags is None:
        return None
    client = flags()
    client.wait_ready(2.0)  # at once when connected; the first job may come before that
    return client.get(key, None, session=Session.from_job(ctx.job))


async def appears(path: Path) -> None:
    # The test's process writes it: there is nothing to await but the file itself.
    while True:
        if path.exists():
            return
        await asyncio.sleep(0.05)


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
                "greeting": flag("greeting", ctx),
            }
        )
    )
    if HERE.joinpath("FAIL").exists():
        # livekit-agents 1.8.9 reports a job failed only when its process exits non-zero (an
        # exception in the entrypoint still ends "succeeded"): die as a broken session does.
        print("this version fails its sessions on purpose", flush=True)
        os._exit(1)
    await asyncio.sleep(hold)
    if json.loads(ctx.job.metadata or "{}").get("until_released"):
        await appears(markers / f"{ctx.job.id}.release")  # written by tests.support.release
    (markers / f"{ctx.job.id}.done").write_text("done")
    ctx.shutdown("done")


def boot_marker() -> None:
    """What this instance was given, as it sees it, before it serves anything."""
    markers, folder = os.environ.get("MARKER_DIR"), os.environ.get("VOICEFLEET_SECRETS_DIR")
    if not markers:
        return
    files = {}
    for path in sorted(Path(folder).iterdir()) if folder else []:
        files[path.name] = {"content": path.read_text(), "mode": path.stat().st_mode & 0o777}
    instance = os.environ.get("VOICEFLEET_INSTANCE_ID", "")
    seen = {"instance": instance, "secret": os.environ.get("VF_TEST_SECRET", "")}
    seen.update(secrets_dir=folder, files=files)
    Path(markers, f"boot-{instance}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    boot_marker()
    executor = JobExecutorType.THREAD if HERE.joinpath("THREADS").exists() else None
    cli.run_app(
        WorkerOptions(
            entrypoint_fnc=entrypoint,
            load_fnc=load,
            load_threshold=LOAD_THRESHOLD,
            **({"job_executor_type": executor} if executor else {}),
        )
    )
