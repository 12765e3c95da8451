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
from dataclasses import dataclass

from voicefleet.dispatch.stats import Window, top
from voicefleet.errors import InvalidRequest, check_numbers
from voicefleet.rollout.model import Run

# The ERROR lines a session logs as it ends reach its instance's log a moment after the worker
# reports the end (they travel from the job process on another channel): this long a moment.
LOG_SETTLE = 1.0


@dataclass(frozen=True)
class SmokeTest:
    sessions: int = 3
    timeout: float = 60.0
    metadata: str = '{"smoke": true}'
    command: str = ""  # run in the version's source folder; exit 0 passes
    # ERROR lines the synthetic sessions may log in all: an exception in a session's code logs
    # one even when the worker reports the session succeeded.
    max_error_lines: int = 0

    def __post_init__(self) -> None:
        numbers: dict[str, object] = {
            "sessions": self.sessions,
            "timeout": self.timeout,
            "max_error_lines": self.max_error_lines,
        }
        check_numbers("smoke test", numbers, ("sessions", "max_error_lines"))
        if not isinstance(self.metadata, str) or not isinstance(self.command, str):
            raise InvalidRequest("smoke test: metadata and command must be strings")
        if not 0 <= self.sessions <= 100:
            raise InvalidRequest("smoke sessions must be between 0 and 100")
        if self.timeout <= 0:
            raise InvalidRequest("the smoke timeout must be > 0 seconds")
        if self.max_error_lines < 0:
            raise InvalidRequest("smoke max_error_lines must be >= 0")


def smoke_verdict(test: SmokeTest, version: str, seen: Window, restarts: int) -> str | None:
    """Why the synthetic sessions fail the smoke test, or None. Pure. `seen` is what the smoke
    sessions did (and nothing else); they are judged as a canary's are, but with no stable to
    compare with, every one must succeed."""
    if restarts:
        return f"a {version} instance crashed during the smoke test"
    n = test.sessions
    if seen.failed:
        return f"{seen.failed}/{n} synthetic session(s) failed: {top(seen.failure_reasons)}"
    if seen.succeeded < n:
        late = n - seen.succeeded
        return f"{late}/{n} synthetic session(s) did not succeed within {test.timeout:g}s"
    if seen.error_lines > test.max_error_lines:
        return (
            f"synthetic sessions logged {seen.error_lines} error line(s): "
            f"{top(seen.error_kinds)}; allowed {test.max_error_lines}"
        )
    return None


async def smoke_test(
    run: Run, version: str, instance_ids: list[str], test: SmokeTest
) -> str | None:
    """Synthetic sessions dispatched to `version` only, then the user's command; None if
    they pass, else why not."""
    fleet, dispatch, target = run.fleet, run.dispatch, run.target
    before = fleet.restarts(instance_ids)
    since = time.time()
    tag = secrets.token_hex(3)
    pinned = [
        dispatch.pinned_dispatch(
            agent_name=target.agent_name,
            room=f"vf-smoke-{version}-{tag}-{i}",
            metadata=test.metadata,
            deployment=target.deployment,
            version=version,
        )
        for i in range(test.sessions)
    ]
    dispatches, jobs = [d for d, _ in pinned], [j for _, j in pinned]
    clock = asyncio.get_running_loop().time  # the clock asyncio.sleep counts on
    deadline = clock() + test.timeout
    while not all(j.ended for j in jobs):
        if clock() > deadline or fleet.restarts(instance_ids) > before:
            break
        await asyncio.sleep(0.1)
    for d in dispatches:
        if not d.deleted_at and any(not j.ended for j in jobs if j.dispatch_id == d.id):
            dispatch.delete_dispatch(d.id, d.room)
    if jobs:
        await asyncio.sleep(LOG_SETTLE)
        fleet.poll_logs()
    seen = dispatch.window(target.agent_name, version, since, {j.id for j in jobs})
    failure = smoke_verdict(test, version, seen, fleet.restarts(instance_ids) - before)
    if failure is not None:
        return failure
    if test.command:
        return await _smoke_command(run, version, instance_ids, test)
    return None


async def _smoke_command(run: Run, version: str, ids: list[str], test: SmokeTest) -> str | None:
    target, paths = run.target, run.fleet.paths
    log_path = paths.version_dir(target.agent_id, version) / "smoke.log"
    env = {
        **os.environ,
        "VOICEFLEET_URL": run.fleet.http_url(),
        "VOICEFLEET_AGENT": target.agent_name,
        "VOICEFLEET_AGENT_ID": target.agent_id,
        "VOICEFLEET_DEPLOYMENT": target.deployment,
        "VOICEFLEET_VERSION": version,
        "VOICEFLEET_INSTANCES": ",".join(ids),
    }
    with open(log_path, "wb") as out:
        proc = await asyncio.create_subprocess_shell(
            test.command,
            cwd=paths.source(target.agent_id, version),
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
