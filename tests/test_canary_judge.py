"""Judging a version by what callers feel, as pure functions over data, in milliseconds.

The per-version stats (failure reasons, session lengths, error lines per session), the canary's
checks over them (`judge`), the smoke test's verdict, and the log follower that counts each
session's ERROR lines in an instance's log (fed lines made by livekit-agents' own JSON
formatter, the pinned 1.8.9, so that the parser reads what instances really write).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import pytest

from voicefleet.dispatch.jobs import Job, JobBook, JobState
from voicefleet.dispatch.stats import NOT_STARTED, VersionStats, Window
from voicefleet.errors import InvalidRequest
from voicefleet.rollout.canary import CanaryPlan, Thresholds, judge
from voicefleet.rollout.smoke import SmokeTest, smoke_verdict
from voicefleet.runtime import InstanceSpec, InstanceState
from voicefleet.runtime.joblogs import MAX_LINE, JobLogs, count_errors, error_line
from voicefleet.runtime.local import LocalRuntime, _Instance

# -- the stats ----------------------------------------------------------------------------------


def run_job(book: JobBook, job_id: str, end: JobState, error: str = "", version: str = "v2") -> Job:
    job = Job(id=job_id, dispatch_id="", agent_name="a", room=job_id, room_sid="")
    book.add_job(job)
    job.version = version
    book.transition(job, JobState.ASSIGNED)
    if end != JobState.PENDING:
        book.transition(job, JobState.RUNNING)
    book.transition(job, end, error)
    return job


def test_stats_name_the_commonest_failure_reasons_by_their_first_line() -> None:
    book, stats = JobBook(), VersionStats()
    book.job_listeners.append(stats.job_changed)
    since = time.time() - 1
    for i in range(5):
        run_job(book, f"raise{i}", JobState.FAILED, "RuntimeError: v2 is broken\n  File agent.py")
    run_job(book, "killed", JobState.FAILED, "job process killed by SIGKILL")
    run_job(book, "silent", JobState.FAILED)
    run_job(book, "dropped", JobState.PENDING)  # the start timeout took it back
    for i in range(3):
        run_job(book, f"ok{i}", JobState.SUCCEEDED)
    seen = stats.window("a", "v2", since)
    assert (seen.ended, seen.failed, seen.succeeded) == (11, 8, 3)
    # Only the three commonest, most common first; ties in the order they came.
    assert seen.failure_reasons == (
        ("RuntimeError: v2 is broken", 5),
        ("job process killed by SIGKILL", 1),
        ("no reason given", 1),
    )
    assert NOT_STARTED not in dict(seen.failure_reasons)  # the fourth reason: left out
    run_job(book, "long", JobState.FAILED, "x" * 10_000)
    assert max(len(r) for r, _ in stats.window("a", "v2", since).failure_reasons) <= 200


def test_stats_over_time_are_the_windows_numbers_as_they_grew() -> None:
    """The canary charts' points: at each moment, the window from `since` up to it."""
    book, stats = JobBook(), VersionStats()
    book.job_listeners.append(stats.job_changed)
    since = time.time() - 1
    run_job(book, "ok0", JobState.SUCCEEDED)
    middle = time.time()
    time.sleep(0.01)
    run_job(book, "bad", JobState.FAILED, "RuntimeError: no")
    run_job(book, "ok1", JobState.SUCCEEDED)
    until = time.time() + 0.01
    points = stats.over_time("a", "v2", since, until, 4)
    assert [m for m, _, _ in points] == pytest.approx(
        [since + (until - since) * k / 4 for k in (1, 2, 3, 4)]
    )
    # The last point is the whole window, as `window` has it.
    whole = stats.window("a", "v2", since)
    assert points[-1][1:] == (whole.failure_rate, whole.start_delay_p50)
    assert points[-1][1] == pytest.approx(1 / 3)
    # Before anything ended, a rate of 0; at `middle`, only the first success.
    early = stats.over_time("a", "v2", since, middle, 2)
    assert early[-1][1] == 0.0 and early[0][1] == 0.0
    # A version with no sessions: zeros at each moment.
    none = stats.over_time("a", "v1", since, until, 3)
    assert len(none) == 3 and all(rate == delay == 0.0 for _, rate, delay in none)


def test_stats_keep_session_lengths_of_successes_that_began_in_the_window() -> None:
    book, stats = JobBook(), VersionStats()
    book.job_listeners.append(stats.job_changed)
    long = Job(id="long", dispatch_id="", agent_name="a", room="long", room_sid="")
    book.add_job(long)
    long.version = "v2"
    book.transition(long, JobState.ASSIGNED)
    book.transition(long, JobState.RUNNING)
    long.started_at -= 60  # a call that began a minute before the window
    since = time.time() - 5
    short = run_job(book, "short", JobState.SUCCEEDED)
    run_job(book, "bad", JobState.FAILED, "boom")
    book.transition(long, JobState.SUCCEEDED)
    seen = stats.window("a", "v2", since)
    # Both succeeded in the window; only the one that also began in it has a length, as the
    # canary's (all begun in the window) would: like is compared with like.
    assert seen.succeeded == 2
    assert seen.durations == (short.ended_at - short.started_at,)


def test_stats_count_error_lines_per_session_and_can_be_limited_to_some_jobs() -> None:
    book, stats = JobBook(), VersionStats()
    book.job_listeners.append(stats.job_changed)
    since = time.time() - 1
    for i in range(4):
        run_job(book, f"j{i}", JobState.SUCCEEDED)
    stats.log_errors("a", "v2", "j0", "unhandled exception: RuntimeError: v2 is broken", 2)
    stats.log_errors("a", "v2", "j1", "unhandled exception: RuntimeError: v2 is broken", 1)
    stats.log_errors("a", "v2", "j1", "could not reach the speech service", 1)
    stats.log_errors("a", "v1", "other", "not this version's", 9)
    seen = stats.window("a", "v2", since)
    assert (seen.error_lines, seen.error_lines_per_session) == (4, 1.0)
    assert seen.error_kinds[0] == ("unhandled exception: RuntimeError: v2 is broken", 3)
    only = stats.window("a", "v2", since, {"j1", "j3"})
    assert (only.ended, only.error_lines) == (2, 2)
    assert stats.window("a", "v2", time.time() + 1).error_lines == 0
    payload = seen.to_dict()
    assert payload["error_lines_per_session"] == 1.0 and payload["succeeded"] == 4


# -- the canary's checks ------------------------------------------------------------------------


def window(
    ended: int = 0,
    failed: int = 0,
    reasons: tuple[tuple[str, int], ...] = (),
    errors: int = 0,
    kinds: tuple[tuple[str, int], ...] = (),
    durations: tuple[float, ...] = (),
) -> Window:
    return Window(
        ended=ended,
        failed=failed,
        started=ended,
        start_delays=(0.1,) * ended,
        durations=durations,
        succeeded=len(durations),
        failure_reasons=reasons,
        error_lines=errors,
        error_kinds=kinds,
    )


BROKEN = (("RuntimeError: v2 is broken", 12),)


def test_a_failing_canary_is_aborted_with_what_failed_its_sessions() -> None:
    why = judge(window(12, 12, BROKEN), window(28), 0, Thresholds())
    assert why == (
        "canary failed 12/12 sessions (100%): RuntimeError: v2 is broken (12); "
        "stable 0/28 (0%); allowed +5%"
    )


def test_a_canary_logging_more_errors_per_session_than_stable_is_aborted() -> None:
    t = Thresholds()
    kinds = (("unhandled exception while running the job task: RuntimeError: v2 is broken", 5),)
    why = judge(window(5, errors=5, kinds=kinds), window(20, errors=2), 0, t)
    assert why is not None
    assert "logged 5 error line(s) in 5 sessions (1.00 per session)" in why
    assert "RuntimeError: v2 is broken (5)" in why and "stable 2 in 20 (0.10)" in why
    # Within the margin of stable's own noise; a noisy stable; too few sessions to judge.
    assert judge(window(10, errors=5), window(20, errors=2), 0, t) is None
    assert judge(window(5, errors=5), window(20, errors=20), 0, t) is None
    assert judge(window(4, errors=40), window(20), 0, t) is None
    assert judge(window(5, errors=5), window(20), 0, Thresholds(max_error_lines_increase=1)) is None


def test_a_canary_whose_calls_end_far_sooner_than_stables_is_aborted() -> None:
    t = Thresholds()
    minutes = window(20, durations=(180.0,) * 20)
    why = judge(window(5, durations=(5.0,) * 5), minutes, 0, t)
    assert why == (
        "canary sessions lasted 5.0s (median of 5) vs stable 180.0s (median of 20); "
        "allowed at least 43.0s"
    )
    # As long as stable's, near enough, or too few calls on either side to say.
    assert judge(window(5, durations=(60.0,) * 5), minutes, 0, t) is None
    assert judge(window(4, durations=(5.0,) * 4), minutes, 0, t) is None
    assert judge(window(5, durations=(5.0,) * 5), window(4, durations=(180.0,) * 4), 0, t) is None
    # Short calls on both sides are not told apart by a few seconds (the slack).
    assert judge(window(5, durations=(0.1,) * 5), window(20, durations=(2.0,) * 20), 0, t) is None
    assert (
        judge(window(5, durations=(5.0,) * 5), minutes, 0, Thresholds(min_duration_ratio=0)) is None
    )


def test_checks_are_asked_in_order_and_the_first_that_fails_says_why() -> None:
    everything = window(12, 12, BROKEN, errors=50, durations=(1.0,) * 12)
    stable = window(28, durations=(180.0,) * 28)
    assert "restarted 1 time(s)" in str(judge(everything, stable, 1, Thresholds()))
    assert str(judge(everything, stable, 0, Thresholds())).startswith("canary failed 12/12")
    no_failures = window(12, errors=50, durations=(1.0,) * 12)
    assert str(judge(no_failures, stable, 0, Thresholds())).startswith("canary logged 50")
    assert judge(window(12, durations=(170.0,) * 12), stable, 0, Thresholds()) is None


def test_new_thresholds_are_plan_fields_checked_once() -> None:
    plan = CanaryPlan.from_dict(
        {"thresholds": {"max_error_lines_increase": 0.2, "min_duration_ratio": 0.5}}
    )
    again = CanaryPlan.from_dict(plan.to_dict())
    assert again.thresholds == plan.thresholds
    assert plan.to_dict()["thresholds"]["duration_slack"] == 2.0
    with pytest.raises(InvalidRequest, match="min_duration_ratio must be <= 1"):
        Thresholds(min_duration_ratio=2)
    with pytest.raises(InvalidRequest, match=">= 0"):
        Thresholds(max_error_lines_increase=-1)


# -- the smoke test's verdict -------------------------------------------------------------------


def test_smoke_sessions_are_judged_by_their_failures_and_error_lines() -> None:
    test = SmokeTest(sessions=3)
    ok = window(3, durations=(0.5,) * 3)
    assert smoke_verdict(test, "v3", ok, 0) is None
    failed = window(3, 3, (("RuntimeError: v3 is broken", 3),))
    assert smoke_verdict(test, "v3", failed, 0) == (
        "3/3 synthetic session(s) failed: RuntimeError: v3 is broken (3)"
    )
    noisy = window(
        3, errors=2, kinds=(("could not reach the speech service", 2),), durations=(0.5,) * 3
    )
    assert smoke_verdict(test, "v3", noisy, 0) == (
        "synthetic sessions logged 2 error line(s): could not reach the speech service (2); "
        "allowed 0"
    )
    assert smoke_verdict(SmokeTest(sessions=3, max_error_lines=2), "v3", noisy, 0) is None
    late = window(1, durations=(0.5,))
    assert smoke_verdict(test, "v3", late, 0) == (
        "2/3 synthetic session(s) did not succeed within 60s"
    )
    assert smoke_verdict(test, "v3", ok, 1) == "a v3 instance crashed during the smoke test"
    with pytest.raises(InvalidRequest):
        SmokeTest(max_error_lines=-1)


# -- reading the instances' logs ----------------------------------------------------------------


def livekit_line(
    message: str, level: int = logging.ERROR, exc: bool = False, **extra: str
) -> bytes:
    """One log line as an instance writes it: livekit-agents' own JSON formatter."""
    from livekit.agents.cli.log import JsonFormatter

    exc_info = None
    if exc:
        try:
            raise RuntimeError("v2 is broken")
        except RuntimeError:
            exc_info = sys.exc_info()
    record = logging.LogRecord("livekit.agents", level, __file__, 1, message, None, exc_info)
    record.__dict__.update(extra)
    return JsonFormatter().format(record).encode()


def test_the_parser_finds_a_sessions_error_lines_and_what_they_say() -> None:
    raised = livekit_line(
        "unhandled exception while running the job task", exc=True, job_id="AJ_1", room="r1"
    )
    assert error_line(raised) == (
        "AJ_1",
        "unhandled exception while running the job task: RuntimeError: v2 is broken",
    )
    # Forwarded from a job process, the message carries the traceback itself as well.
    forwarded = livekit_line(
        "unhandled exception while running the job task\nTraceback (most recent call last):\n"
        '  File "agent.py", line 50, in entrypoint\nRuntimeError: v2 is broken',
        job_id="AJ_2",
    )
    assert error_line(forwarded) == (
        "AJ_2",
        "unhandled exception while running the job task: RuntimeError: v2 is broken",
    )
    died = livekit_line("process exited with non-zero exit code 1", job_id="AJ_3")
    assert error_line(died) == ("AJ_3", "process exited with non-zero exit code 1")
    assert error_line(livekit_line("out of memory", logging.CRITICAL, job_id="AJ_4")) == (
        "AJ_4",
        "out of memory",
    )
    # Not a session's error: info, the worker's own errors, output that is not JSON.
    assert error_line(livekit_line("received job request", logging.INFO, job_id="AJ_1")) is None
    assert error_line(livekit_line("failed to connect to livekit")) is None
    assert error_line(b"Traceback (most recent call last): ERROR") is None
    assert error_line(b'{"level": "ERROR", "job_id": ') is None
    counts = count_errors([raised, raised, died, b"--- voicefleet: starting x (v2)"])
    assert counts == {
        ("AJ_1", "unhandled exception while running the job task: RuntimeError: v2 is broken"): 2,
        ("AJ_3", "process exited with non-zero exit code 1"): 1,
    }


class Reports:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str, str, int]] = []

    def __call__(self, agent: str, version: str, job_id: str, kind: str, n: int) -> None:
        self.seen.append((agent, version, job_id, kind, n))

    def total(self, job_id: str) -> int:
        return sum(n for _, _, j, _, n in self.seen if j == job_id)


def append(path: Path, *lines: bytes, end: bytes = b"\n") -> None:
    with open(path, "ab") as f:
        f.write(b"\n".join(lines) + end)


def test_the_follower_reads_only_what_was_appended_since_it_looked(tmp_path: Path) -> None:
    path = tmp_path / "i1.log"
    before = livekit_line("from before it followed", job_id="AJ_old")
    append(path, before)
    reports = Reports()
    logs = JobLogs(reports)
    logs.follow("i1", path, "a", "v2")
    logs.poll()
    assert reports.seen == []  # an adopted instance's past is not counted now
    err = livekit_line("could not reach the speech service", job_id="AJ_1")
    append(path, err, err)
    logs.poll()
    logs.poll()  # nothing new: nothing read again
    assert reports.seen == [("a", "v2", "AJ_1", "could not reach the speech service", 2)]
    # A line the instance is still writing is counted once it is whole.
    append(path, err[:30], end=b"")
    logs.poll()
    append(path, err[30:])
    logs.poll()
    assert reports.total("AJ_1") == 3
    # Its instance stopped: what it wrote last is read, then the file is let go.
    append(path, err)
    logs.forget("i1")
    logs.poll()
    assert reports.total("AJ_1") == 4 and logs.following() == []


def test_the_follower_reads_across_the_local_runtimes_rotation(tmp_path: Path) -> None:
    spec = InstanceSpec("i1", "CA_x", "v2", tmp_path, Path(sys.executable), {}, tmp_path)
    state = InstanceState(spec)
    runtime = LocalRuntime(log_max_bytes=1000, log_keep=2)
    reports = Reports()
    logs = JobLogs(reports)
    append(state.log_path, b"--- voicefleet: starting i1 (v2)")
    logs.follow("i1", state.log_path, "a", "v2")
    err = livekit_line("could not reach the speech service", job_id="AJ_1")
    written = 0
    for _ in range(3):
        append(state.log_path, err)
        logs.poll()
        # Lines not read yet when it rotates are in the copy; the file starts again at 0.
        while state.log_path.stat().st_size <= 1000:
            append(state.log_path, err)
            written += 1
        runtime._rotate(_Instance(state))
        assert state.log_path.stat().st_size == 0
        append(state.log_path, err)
        logs.poll()
        written += 2
    assert reports.total("AJ_1") == written  # each line once, none lost
    logs.poll()
    assert reports.total("AJ_1") == written  # never read again from the start


def test_an_overlong_line_is_skipped_not_held(tmp_path: Path) -> None:
    path = tmp_path / "i1.log"
    path.touch()
    reports = Reports()
    logs = JobLogs(reports)
    logs.follow("i1", path, "a", "v2")
    err = livekit_line("could not reach the speech service", job_id="AJ_1")
    huge = b'{"level": "ERROR", "job_id": "AJ_big", "message": "' + b"x" * (MAX_LINE + 10)
    append(path, huge, end=b"")
    logs.poll()
    logs.poll()
    append(path, b'"}', err)
    logs.poll()
    assert reports.total("AJ_big") == 0 and reports.total("AJ_1") == 1
