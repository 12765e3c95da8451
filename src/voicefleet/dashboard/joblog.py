"""A session's log lines: the lines of its instance's log that name its job id (livekit-agents
writes its job process's records with the job id; voicefleet's launcher does too).

The session page's stream looks every second: each (file, job) remembers how far it read, so
a look reads only what was appended since (a file that shrank was rotated: read again)."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from voicefleet.control.logs import log_files
from voicefleet.errors import NotFound
from voicefleet.fleet import Paths

MAX_LINES = 500  # the newest shown
LINE_CHARS = 2000  # a longer line is cut
_REMEMBERED = 64  # (file, job) pairs whose reading is kept


@dataclass
class _Read:
    offset: int = 0
    partial: bytes = b""  # the last line, not ended yet
    lines: list[str] = field(default_factory=list)


_reads: OrderedDict[tuple[Path, str], _Read] = OrderedDict()


def _scan(path: Path, job_id: str, read: _Read) -> None:
    size = path.stat().st_size
    if size < read.offset:
        read.offset, read.partial, read.lines = 0, b"", []
    needle = job_id.encode()
    with open(path, "rb") as f:
        f.seek(read.offset)
        while chunk := f.read(1 << 20):
            read.offset += len(chunk)
            *whole, read.partial = (read.partial + chunk).split(b"\n")
            read.lines += [
                line.decode(errors="replace").rstrip("\r")[:LINE_CHARS]
                for line in whole
                if needle in line
            ]
            del read.lines[:-MAX_LINES]


async def session_lines(paths: Paths, agent_id: str, instance: str, job_id: str) -> list[str]:
    """The lines of the instance's log naming `job_id` (the newest MAX_LINES); none if the
    instance has no log here."""
    try:
        (path,) = log_files(paths, agent_id, instance)
    except NotFound:
        return []
    key = (path, job_id)
    read = _reads.pop(key, None) or _Read()
    _reads[key] = read
    while len(_reads) > _REMEMBERED:
        _reads.popitem(last=False)
    await asyncio.to_thread(_scan, path, job_id, read)
    tail = [read.partial.decode(errors="replace")] if job_id.encode() in read.partial else []
    return read.lines + tail
