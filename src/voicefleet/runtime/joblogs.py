"""Error lines per session, read from the instances' own logs.

livekit-agents writes one JSON object per line, with "level", and "job_id" on every line about a
job (its job processes' lines too: the worker adds the job's fields as it forwards them). An
exception a session's code raised, or a job process that died, shows up here as an ERROR line
with the session's job id, whatever state the worker reports for the job. `JobLogs` follows the
log files of running instances, counts ERROR/CRITICAL lines per job id and reports them; the
dispatcher's per-version stats turn them into "error lines per session" for canary analysis and
smoke tests. Nothing about the agent changes.

Following a file: it starts at the file's end as it is when followed (what was there before is
an adopted instance's past), then reads what was appended, at most `MAX_READ` bytes per poll,
so it never reads a file from the start again and a flood is caught up over a few polls. The
local runtime rotates by copy-then-truncate: a new `<log>.1` means the rest of what was not read
yet is in that copy, and the file itself starts again at 0. Memory is bounded: a partial last
line (at most `MAX_LINE` bytes) per file; counts leave with each report.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("voicefleet.runtime")

ERROR_LEVELS = frozenset({"ERROR", "CRITICAL"})
MAX_READ = 1 << 20  # bytes read per file per poll
MAX_LINE = 1 << 20  # a longer line is skipped rather than held in memory
KIND_CHARS = 200

# (agent name, version, job id, kind of line, how many)
Report = Callable[[str, str, str, str, int], None]


def error_line(line: bytes) -> tuple[str, str] | None:
    """(job id, kind) of an ERROR/CRITICAL line about a job, else None.

    The kind is the message's first line, and the exception's own last line when the line
    carries one: "unhandled exception while running the job task: RuntimeError: v2 is broken".
    """
    if b'"ERROR"' not in line and b'"CRITICAL"' not in line:  # most lines: no JSON parse
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or record.get("level") not in ERROR_LEVELS:
        return None
    job_id = record.get("job_id")
    if not isinstance(job_id, str) or not job_id:
        return None  # the worker's own trouble, not a session's
    message = str(record.get("message", ""))
    lines = [s for s in message.strip().splitlines() if s.strip()]
    kind = lines[0].strip() if lines else "error"
    trace = str(record.get("exc_info") or "")
    if not trace and len(lines) > 1 and lines[1].startswith("Traceback"):
        trace = message  # the formatter put the traceback in the message
    raised = [s for s in trace.strip().splitlines() if s.strip()]
    if raised and raised[-1].strip() != kind:
        kind = f"{kind}: {raised[-1].strip()}"
    return job_id, kind[:KIND_CHARS]


def count_errors(lines: Iterable[bytes]) -> Counter[tuple[str, str]]:
    """ERROR/CRITICAL lines per (job id, kind)."""
    counts: Counter[tuple[str, str]] = Counter()
    for line in lines:
        found = error_line(line)
        if found is not None:
            counts[found] += 1
    return counts


def _signature(path: Path) -> tuple[int, int] | None:
    """What tells one rotated copy from the next: rotating rewrites it."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


@dataclass(eq=False)
class _Followed:
    path: Path
    agent_name: str
    version: str
    offset: int
    rotated: tuple[int, int] | None  # signature of `<log>.1` when last seen
    partial: bytes = b""
    skipping: bool = False  # inside a line longer than MAX_LINE
    closing: bool = False  # its instance stopped: read the rest once, then let go

    @property
    def copy(self) -> Path:
        return self.path.with_name(self.path.name + ".1")

    def lines(self, data: bytes) -> list[bytes]:
        """Whole lines of what was read, the partial last one kept for the next read."""
        parts = (self.partial + data).split(b"\n")
        self.partial = parts.pop()
        if self.skipping and parts:
            parts.pop(0)  # the end of the overlong line
            self.skipping = False
        if len(self.partial) > MAX_LINE:
            self.partial, self.skipping = b"", True
        return parts

    def restart(self) -> None:
        self.offset, self.partial, self.skipping = 0, b"", False

    def read(self) -> list[bytes]:
        """What was appended since the last read, across a rotation."""
        lines: list[bytes] = []
        rotated = _signature(self.copy)
        if rotated != self.rotated:
            self.rotated = rotated
            if rotated is not None:
                # Copied then truncated since the last read. Both happen in one call of the
                # runtime's supervisor on this event loop, never halfway through a read.
                lines += self.lines(_read(self.copy, self.offset))
                self.restart()
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return lines
        if size < self.offset:  # truncated by someone else: what was lost is lost
            self.restart()
        if size > self.offset:
            data = _read(self.path, self.offset)
            self.offset += len(data)
            lines += self.lines(data)
        return lines


def _read(path: Path, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(MAX_READ)


class JobLogs:
    """Follows instances' log files and reports their sessions' error lines."""

    def __init__(self, report: Report, interval: float = 1.0) -> None:
        self._report = report
        self.interval = interval
        self._files: dict[str, _Followed] = {}

    def follow(self, instance_id: str, path: Path, agent_name: str, version: str) -> None:
        """Start following an instance's log from its current end (again: a no-op)."""
        if instance_id in self._files:
            self._files[instance_id].closing = False
            return
        try:
            offset = path.stat().st_size
        except FileNotFoundError:
            offset = 0
        copy = path.with_name(path.name + ".1")
        self._files[instance_id] = _Followed(path, agent_name, version, offset, _signature(copy))

    def forget(self, instance_id: str) -> None:
        """Its instance stopped: the next poll reads what it wrote last, then lets go."""
        followed = self._files.get(instance_id)
        if followed is not None:
            followed.closing = True

    def following(self) -> list[str]:
        return list(self._files)

    def poll(self) -> None:
        """Read what every followed log gained and report its error lines."""
        for instance_id, followed in list(self._files.items()):
            try:
                lines = followed.read()
            except OSError as e:  # e.g. permissions changed: try again next time
                log.warning("cannot read instance log: %s", e, extra={"instance": instance_id})
                continue
            for (job_id, kind), n in count_errors(lines).items():
                self._report(followed.agent_name, followed.version, job_id, kind, n)
            if followed.closing:
                del self._files[instance_id]

    async def run(self) -> None:
        while True:
            try:
                self.poll()
            except Exception:  # a bad report must not end the following
                log.exception("following instance logs failed")
            await asyncio.sleep(self.interval)
