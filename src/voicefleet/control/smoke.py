"""Blue-green's smoke test: synthetic sessions pinned to the new version, then the user's command.

Passes (None) when every synthetic session ran and succeeded with no instance of the version
restarting and no more error lines in their logs than allowed (`smoke_verdict`), and the
command, if any, exited 0; else returns why not.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from typing import TYPE_CHECKING

from voicefleet.rollout.bluegreen import SmokeTest, smoke_verdict
from voicefleet.store.models import AgentRow

if TYPE_CHECKING:
    from voicefleet.control.service import ControlPlane

# The ERROR lines a session logs as it ends reach its instance's log a moment after the worker
# reports the end (they travel from the job process on another channel): this long a moment.
LOG_SETTLE = 1.0


async def smoke_test(
    plane: ControlPlane,
    agent_id: str,
    deployment: str,
    version: str,
    instance_ids: list[str],
    test: SmokeTest,
) -> str | None:
    """Synthetic sessions dispatched to `version` only, then the user's command; None if
    they pass, else why not."""
    agent = await plane.agent(agent_id)
    before = plane.restarts(instance_ids)
    since = time.time()
    tag = secrets.token_hex(3)
    dispatches = [
        plane.dispatch.create_dispatch(
            agent_name=agent.name,
            room=f"vf-smoke-{version}-{tag}-{i}",
            metadata=test.metadata,
            deployment=deployment,
            pin_version=version,
        )
        for i in range(test.sessions)
    ]
    jobs = [plane.dispatch.book.jobs[d.job_ids[0]] for d in dispatches]
    deadline = time.monotonic() + test.timeout
    while not all(j.ended for j in jobs):
        if time.monotonic() > deadline or plane.restarts(instance_ids) > before:
            break
        await asyncio.sleep(0.1)
    for d in dispatches:
        if not d.deleted_at and any(not j.ended for j in jobs if j.dispatch_id == d.id):
            plane.dispatch.delete_dispatch(d.id, d.room)
    if jobs:
        await asyncio.sleep(LOG_SETTLE)
        plane.instances.joblogs.poll()
    seen = plane.dispatch.stats.window(agent.name, version, since, {j.id for j in jobs})
    failure = smoke_verdict(test, version, seen, plane.restarts(instance_ids) - before)
    if failure is not None:
        return failure
    if test.command:
        return await _smoke_command(plane, agent, deployment, version, instance_ids, test)
    return None


async def _smoke_command(
    plane: ControlPlane,
    agent: AgentRow,
    deployment: str,
    version: str,
    ids: list[str],
    test: SmokeTest,
) -> str | None:
    log_path = plane.paths.version_dir(agent.id, version) / "smoke.log"
    env = {
        **os.environ,
        "VOICEFLEET_URL": plane.instances.http_url(),
        "VOICEFLEET_AGENT": agent.name,
        "VOICEFLEET_AGENT_ID": agent.id,
        "VOICEFLEET_DEPLOYMENT": deployment,
        "VOICEFLEET_VERSION": version,
        "VOICEFLEET_INSTANCES": ",".join(ids),
    }
    with open(log_path, "wb") as out:
        proc = await asyncio.create_subprocess_shell(
            test.command,
            cwd=plane.paths.source(agent.id, version),
            env=env,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = await asyncio.wait_for(proc.wait(), test.timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return f"smoke command did not finish within {test.timeout:g}s"
    if code != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
        return f"smoke command exited {code}: " + " | ".join(tail)
    return None
