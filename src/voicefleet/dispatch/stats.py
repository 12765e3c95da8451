"""Per-version outcomes of recent jobs, for comparing a canary with the stable version.

Kept in memory from the job book's changes (the dispatcher sees every transition first hand), a
bounded window per (agent name, version); the analysis asks for counts over a time window.
Besides the job states it keeps what a caller feels but a state hides: why sessions failed,
how long the successful ones lasted, and the ERROR lines each session logged (reported by
`voicefleet.runtime.joblogs`, which follows the instances' logs).
"""

from __future__ import annotations

import bisect
import statistics
import time
from collections import Counter, deque
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from voicefleet.dispatch.jobs import Job, JobState

KEEP = 20_000  # events per version
TOP = 3  # most common failure reasons / error lines a window names
REASON_CHARS = 200  # a reason is the first line of an error, cut to this
NOT_STARTED = "accepted, not started in time"
NO_REASON = "no reason given"


def first_line(text: str) -> str:
    """A reason to count and show: the first line of an error, bounded."""
    line = text.strip().split("\n", 1)[0].strip()
    return line[:REASON_CHARS] if line else NO_REASON


def top(counts: Iterable[tuple[str, int]]) -> str:
    """'RuntimeError: v2 is broken (12), TimeoutError (1)': what a window saw, for a reason."""
    return ", ".join(f"{text} ({count})" for text, count in counts)


@dataclass(frozen=True)
class Window:
    """What the jobs of one version did since some moment."""

    ended: int
    failed: int
    started: int
    start_delays: tuple[float, ...]  # seconds from assignment to running
    # Seconds from running to ended of the sessions that succeeded, started in the window too:
    # otherwise a young window would hold only the canary's short calls (its long ones are still
    # going) against stable's long ones that began before it.
    durations: tuple[float, ...] = ()
    succeeded: int = 0
    failure_reasons: tuple[tuple[str, int], ...] = ()  # most common first, at most TOP
    error_lines: int = 0  # ERROR/CRITICAL lines its sessions logged
    error_kinds: tuple[tuple[str, int], ...] = ()  # the most common of those lines

    @property
    def failure_rate(self) -> float:
        return self.failed / self.ended if self.ended else 0.0

    @property
    def start_delay_p50(self) -> float:
        return statistics.median(self.start_delays) if self.start_delays else 0.0

    @property
    def duration_p50(self) -> float:
        return statistics.median(self.durations) if self.durations else 0.0

    @property
    def error_lines_per_session(self) -> float:
        return self.error_lines / self.ended if self.ended else 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            "ended": self.ended,
            "failed": self.failed,
            "failure_rate": round(self.failure_rate, 4),
            "failure_reasons": [list(r) for r in self.failure_reasons],
            "started": self.started,
            "start_delay_p50": round(self.start_delay_p50, 4),
            "succeeded": self.succeeded,
            "duration_p50": round(self.duration_p50, 4),
            "error_lines": self.error_lines,
            "error_lines_per_session": round(self.error_lines_per_session, 4),
            "error_kinds": [list(k) for k in self.error_kinds],
        }


@dataclass(frozen=True)
class _End:
    at: float
    job_id: str
    failed: bool
    reason: str  # of a failure
    started: float
    duration: float | None  # of a success


@dataclass(frozen=True)
class _Errors:
    at: float
    job_id: str
    count: int
    kind: str


class VersionStats:
    def __init__(self) -> None:
        self._ends: dict[tuple[str, str], deque[_End]] = {}
        self._starts: dict[tuple[str, str], deque[tuple[float, float, str]]] = {}
        self._errors: dict[tuple[str, str], deque[_Errors]] = {}

    def job_changed(self, job: Job, previous: JobState | None) -> None:
        if not job.version or previous == job.state:
            return
        key = (job.agent_name, job.version)
        if job.state == JobState.RUNNING and job.assigned_at:
            starts = self._starts.setdefault(key, deque(maxlen=KEEP))
            starts.append((job.started_at, job.started_at - job.assigned_at, job.id))
        elif job.ended and previous in (JobState.ASSIGNED, JobState.RUNNING):
            # Deleted dispatches are the caller's doing, not the version's.
            failed = job.state == JobState.FAILED
            started = job.started_at or job.assigned_at
            duration = job.ended_at - started if job.state == JobState.SUCCEEDED else None
            reason = first_line(job.error) if failed else ""
            self._end(key, _End(job.ended_at, job.id, failed, reason, started, duration))
        elif job.state == JobState.PENDING and previous == JobState.ASSIGNED:
            # Accepted, never started (the next worker gets it): a failure of this version.
            now = time.time()
            self._end(key, _End(now, job.id, True, NOT_STARTED, now, None))

    def _end(self, key: tuple[str, str], end: _End) -> None:
        self._ends.setdefault(key, deque(maxlen=KEEP)).append(end)

    def log_errors(self, agent_name: str, version: str, job_id: str, kind: str, count: int) -> None:
        """A session of the version logged `count` ERROR/CRITICAL lines of this `kind`."""
        errors = self._errors.setdefault((agent_name, version), deque(maxlen=KEEP))
        errors.append(_Errors(time.time(), job_id, count, kind[:REASON_CHARS]))

    def window(
        self, agent_name: str, version: str, since: float, jobs: Collection[str] | None = None
    ) -> Window:
        """The version's jobs since `since`; only those in `jobs` if given (a smoke test's)."""
        key = (agent_name, version)

        def mine(at: float, job_id: str) -> bool:
            return at >= since and (jobs is None or job_id in jobs)

        ends = [e for e in self._ends.get(key, ()) if mine(e.at, e.job_id)]
        delays = tuple(d for t, d, j in self._starts.get(key, ()) if mine(t, j))
        errors = [e for e in self._errors.get(key, ()) if mine(e.at, e.job_id)]
        reasons: Counter[str] = Counter(e.reason for e in ends if e.failed)
        kinds: Counter[str] = Counter()
        for e in errors:
            kinds[e.kind] += e.count
        return Window(
            ended=len(ends),
            failed=sum(e.failed for e in ends),
            started=len(delays),
            start_delays=delays,
            durations=tuple(
                e.duration for e in ends if e.duration is not None and e.started >= since
            ),
            succeeded=sum(e.duration is not None for e in ends),
            failure_reasons=tuple(reasons.most_common(TOP)),
            error_lines=sum(e.count for e in errors),
            error_kinds=tuple(kinds.most_common(TOP)),
        )

    def over_time(
        self, agent_name: str, version: str, since: float, until: float, points: int
    ) -> list[tuple[float, float, float]]:
        """How `window(since)` moved: at `points` moments spread evenly over (since, until],
        (moment, failure rate, median start delay) of the version's jobs from `since` up to
        it. One pass over the version's events."""
        key = (agent_name, version)
        ends = sorted((e.at, e.failed) for e in self._ends.get(key, ()) if since <= e.at <= until)
        starts = sorted((t, d) for t, d, _ in self._starts.get(key, ()) if since <= t <= until)
        out: list[tuple[float, float, float]] = []
        delays: list[float] = []
        ended = failed = e = s = 0
        for k in range(1, max(points, 1) + 1):
            moment = since + (until - since) * k / max(points, 1)
            while e < len(ends) and ends[e][0] <= moment:
                ended, failed, e = ended + 1, failed + ends[e][1], e + 1
            while s < len(starts) and starts[s][0] <= moment:
                bisect.insort(delays, starts[s][1])
                s += 1
            median = statistics.median(delays) if delays else 0.0
            out.append((moment, failed / ended if ended else 0.0, median))
        return out
