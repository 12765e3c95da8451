"""A session's log lines (dashboard/joblog.py) from a real log file: only the lines naming the
job, read again only where the file grew, and from the start when it was rotated."""

from __future__ import annotations

from pathlib import Path

from voicefleet.dashboard.joblog import session_lines
from voicefleet.fleet import Paths


async def test_a_sessions_lines_are_those_naming_it_as_the_log_grows_and_rotates(
    tmp_path: Path,
) -> None:
    paths = Paths(tmp_path)
    folder = paths.instance_logs("CA_1")
    folder.mkdir(parents=True)
    log = folder / "bot-v1-1.log"
    log.write_text(
        '{"message": "received job request", "job_id": "AJ_mine"}\n'
        '{"message": "received job request", "job_id": "AJ_other"}\n'
        '{"message": "half a line", "job_id": "AJ_mi'
    )
    assert await session_lines(paths, "CA_1", "bot-v1-1", "AJ_mine") == [
        '{"message": "received job request", "job_id": "AJ_mine"}'
    ]
    with log.open("a") as f:  # the line ends, another one comes
        f.write('ne"}\nplain text about AJ_other\nplain text about AJ_mine\n')
    assert await session_lines(paths, "CA_1", "bot-v1-1", "AJ_mine") == [
        '{"message": "received job request", "job_id": "AJ_mine"}',
        '{"message": "half a line", "job_id": "AJ_mine"}',
        "plain text about AJ_mine",
    ]
    log.write_text("rotated: AJ_mine again\n")  # shorter than what was read: read anew
    assert await session_lines(paths, "CA_1", "bot-v1-1", "AJ_mine") == ["rotated: AJ_mine again"]
    # No log for that instance (or a path instead of an id): no lines, no error.
    assert await session_lines(paths, "CA_1", "bot-v1-2", "AJ_mine") == []
    assert await session_lines(paths, "CA_1", "../../etc/passwd", "AJ_mine") == []
