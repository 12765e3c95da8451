"""Per-version outcomes of recent jobs, for comparing a canary with the stable version.

Kept in memory from the job book's changes (the dispatcher sees every transition first hand), a
bounded window per (agent name, version); the analysis asks for counts over a time window.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass

from voicefleet.dispatch.jobs import Job, JobState

KEEP = 20_000  # events per version


@dataclass(frozen=True)
class Window:
    """What the jobs of one version did since some moment."""

    ended: int
    failed: int
    started: int
    start_delays: tuple[float, ...]  # seconds from assignment to running

    @property
    def failure_rate(self) -> float:
        return self.failed / self.ended if self.ended else 0.0

    @property
    def start_delay_p50(self) -> float:
        return statistics.median(self.start_delays) if self.start_delays else 0.0

    def to_dict(self) -> dict[str, float | int]:
        return {
            "ended": self.ended,
            "failed": self.failed,
            "failure_rate": round(self.failure_rate, 4),
            "started": self.started,
            "start_delay_p50": round(self.start_delay_p50, 4),
        }


class VersionStats:
    def __init__(self) -> None:
        self._ends: dict[tuple[str, str], deque[tuple[float, bool]]] = {}
        self._starts: dict[tuple[str, str], deque[tuple[float, float]]] = {}

    def job_changed(self, job: Job, previous: JobState | None) -> None:
        if not job.version:
            return
        key = (job.agent_name, job.version)
        if job.state == JobState.RUNNING and job.assigned_at:
            starts = self._starts.setdefault(key, deque(maxlen=KEEP))
            starts.append((job.started_at, job.started_at - job.assigned_at))
        elif job.ended and previous in (JobState.ASSIGNED, JobState.RUNNING):
            # Deleted dispatches are the caller's doing, not the version's.
            failed = job.state == JobState.FAILED
            self._ends.setdefault(key, deque(maxlen=KEEP)).append((job.ended_at, failed))
        elif job.state == JobState.PENDING and previous == JobState.ASSIGNED:
            # Accepted, never started (the next worker gets it): a failure of this version.
            self._ends.setdefault(key, deque(maxlen=KEEP)).append((time.time(), True))

    def window(self, agent_name: str, version: str, since: float) -> Window:
        ends = [f for t, f in self._ends.get((agent_name, version), ()) if t >= since]
        delays = tuple(d for t, d in self._starts.get((agent_name, version), ()) if t >= since)
        return Window(ended=len(ends), failed=sum(ends), started=len(delays), start_delays=delays)
