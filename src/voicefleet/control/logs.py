"""Instances' and builds' logs as files: which file is an instance's, and following one.

`vf agent logs --follow` (through `/api/v1`) and the dashboard's live log read them the same
way, with `log_files` and `tail`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from voicefleet.errors import NotFound
from voicefleet.fleet import Paths


def log_files(paths: Paths, agent_id: str, instance: str | None = None) -> list[Path]:
    """One instance's log file, or every log of the agent's instances, oldest first."""
    folder = paths.instance_logs(agent_id)
    if instance is None:
        return sorted(folder.glob("*.log"), key=lambda p: p.stat().st_mtime)
    path = folder / f"{instance}.log"
    # An instance id, not a path: "../../x" must not read another file.
    if path.parent != folder or not path.exists():
        raise NotFound(f"no logs for instance '{instance}'")
    return [path]


async def tail(
    path: Path, follow: bool, finished: Callable[[], Awaitable[bool]], offset: int = 0
) -> AsyncIterator[bytes]:
    """A file's content from `offset`, then (following) what is appended until `finished()`
    says so."""
    while True:
        if path.exists():
            if path.stat().st_size < offset:
                offset = 0  # rotated (copy-truncate): start over on the new content
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            if chunk:
                offset += len(chunk)
                yield chunk
                continue
        if not follow or await finished():
            if path.exists() and path.stat().st_size > offset:
                continue  # the last lines arrived with the end
            return
        await asyncio.sleep(0.2)
