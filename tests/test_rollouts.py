"""Traffic control: the weighted routing table, canary with automatic abort, blue-green.

The pure parts (session hashing, the canary's verdict) are checked directly; the rest runs as a
user would: `vf agent deploy --canary/--steps/--strategy bluegreen` against a real `vf server`,
real livekit-agents 1.8.9 workers (tests/agents/deployable) and the real livekit-api client.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from livekit import api

from tests.support import (
    DEV_KEY,
    DEV_SECRET,
    ROOT,
    Server,
    admin_token,
    release,
    started,
    wait_for,
)
from tests.test_deploy import (
    AGENT_SRC,
    all_stopped,
    api_get,
    deploy_v1,
    dispatch,
    job_state,
    vf,
)
from voicefleet.dispatch.jobs import Job, JobBook, JobState
from voicefleet.dispatch.routing import BUCKETS, RoutingTable, bucket
from voicefleet.dispatch.stats import NOT_STARTED, VersionStats, Window
from voicefleet.rollout.canary import Thresholds, judge, may_advance

# -- the routing table --------------------------------------------------------------------------


def test_a_session_always_lands_on_the_same_version() -> None:
    table = RoutingTable()
    table.set_weights("a", {"v1": 90, "v2": 10})
    keys = [f"AD_{secrets.token_hex(6)}" for _ in range(200)]
    first = [table.choose("a", "", k) for k in keys]
    table.set_weights("a", {"v1": 90, "v2": 10})  # set again (e.g. after a restart)
    assert [table.choose("a", "", k) for k in keys] == first
    assert RoutingTable().choose("a", "", keys[0]) is None  # no entry: any worker
    assert bucket(keys[0]) == bucket(keys[0]) < BUCKETS


def test_the_split_over_many_sessions_matches_the_weights() -> None:
    # 10,000 random dispatch ids at 10 %: binomial, sd = sqrt(n p (1-p)) = 30; 4 sd = 120.
    table = RoutingTable()
    table.set_weights("a", {"stable": 90, "canary": 10})
    routes = Counter(
        table.choose("a", "", f"AD_{secrets.token_hex(6)}").version  # type: ignore[union-attr]
        for _ in range(10_000)
    )
    assert abs(routes["canary"] - 1000) <= 120, routes
    route = table.choose("a", "", "AD_x")
    assert route is not None and route.others == (
        {"stable": "canary", "canary": "stable"}[route.version],
    )


def test_weight_zero_takes_nothing_not_even_overflow_and_empty_routes_nowhere() -> None:
    table = RoutingTable()
    table.set_weights("a", {"blue": 100, "green": 0})
    chosen = {table.choose("a", "", f"k{i}") for i in range(500)}
    assert chosen == {table.choose("a", "", "k0")}
    route = table.choose("a", "", "k0")
    assert route is not None and route.version == "blue" and route.others == ()
    table.set_weights("a", {})
    assert table.choose("a", "", "k0") == table.choose("a", "", "k1")
    assert table.choose("a", "", "k0").version == ""  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        table.set_weights("a", {"v1": -1})


def test_deployments_route_separately() -> None:
    table = RoutingTable()
    table.set_weights("a", {"v1": 100})
    table.set_weights("a", {"v2": 100}, "staging")
    assert table.choose("a", "", "k").version == "v1"  # type: ignore[union-attr]
    assert table.choose("a", "production", "k").version == "v1"  # type: ignore[union-attr]
    assert table.choose("a", "staging", "k").version == "v2"  # type: ignore[union-attr]


# -- the canary's verdict -----------------------------------------------------------------------


def test_version_stats_count_failures_and_sessions_accepted_but_never_started() -> None:
    book, stats = JobBook(), VersionStats()
    book.job_listeners.append(stats.job_changed)
    since = time.time() - 1
    outcomes = {"ok": JobState.SUCCEEDED, "bad": JobState.FAILED, "dropped": JobState.PENDING}
    for name, end in outcomes.items():
        job = Job(id=name, dispatch_id="", agent_name="a", room=name, room_sid="")
        book.add_job(job)
        job.version = "v2"
        book.transition(job, JobState.ASSIGNED)
        if end != JobState.PENDING:
            book.transition(job, JobState.RUNNING)
        book.transition(job, end)  # "dropped": the start timeout took it back
    seen = stats.window("a", "v2", since)
    assert (seen.ended, seen.failed, seen.started) == (3, 2, 2)
    assert stats.window("a", "v1", since).ended == 0


def window(ended: int = 0, failed: int = 0, delays: tuple[float, ...] = ()) -> Window:
    return Window(ended=ended, failed=failed, started=len(delays), start_delays=delays)


def test_canary_verdicts() -> None:
    t = Thresholds()
    healthy = window(100, 1, (0.1,) * 100)
    assert judge(window(20, 1, (0.1,) * 20), healthy, 0, t) is None
    # Too few sessions to judge a rate, however bad.
    assert judge(window(4, 4), healthy, 0, t) is None
    why = judge(window(5, 5), healthy, 0, t)
    assert why is not None and "5/5" in why and "+5%" in why
    # Worse than stable by more than the allowance; stable failing just as much is not the canary.
    assert judge(window(20, 3), healthy, 0, t) is not None
    assert judge(window(20, 3), window(100, 15), 0, t) is None
    # Slow to start: median above stable's x2 + 1 s.
    slow = judge(window(delays=(2.0,) * 5), window(delays=(0.4,) * 5), 0, t)
    assert slow is not None and "2.00s" in slow
    assert judge(window(delays=(1.5,) * 5), window(delays=(0.4,) * 5), 0, t) is None
    crashed = judge(window(), healthy, 1, t)
    assert crashed is not None and "crash" in crashed
    assert judge(window(), healthy, 1, Thresholds(max_restarts=1)) is None


def test_a_step_moves_on_only_after_its_interval_and_enough_sessions_to_judge() -> None:
    t = Thresholds(min_sessions=5)
    assert may_advance(300, 300, window(5), t)
    assert not may_advance(299, 300, window(50), t)  # not yet
    # Two failed sessions a step, never judged: held, not promoted step after step.
    assert not may_advance(3600, 300, window(2, 2), t)
    assert may_advance(0, 0, window(), Thresholds(min_sessions=0))


BAD_PLANS = {
    "no steps": ({"strategy": "canary", "steps": []}, "at least one step"),
    "shrinking steps": ({"strategy": "canary", "steps": [50, 10]}, "must grow"),
    "step over 100": ({"strategy": "canary", "steps": [150]}, "(0, 100]"),
    "steps not numbers": ({"strategy": "canary", "steps": "ten"}, "bad canary plan"),
    "NaN interval": ({"strategy": "canary", "interval": "nan"}, "interval must be >= 0"),
    "threshold text": (
        {"strategy": "canary", "thresholds": {"min_sessions": "many"}},
        "min_sessions must be a whole number (got 'many')",
    ),
    "infinite threshold": (  # JSON's 1e999: not an OverflowError (500) in int()
        {"strategy": "canary", "thresholds": {"min_sessions": float("inf")}},
        "min_sessions must be a whole number (got inf)",
    ),
    "negative threshold": (
        {"strategy": "canary", "thresholds": {"max_failure_rate_increase": -0.1}},
        "thresholds must be >= 0",
    ),
    "unknown threshold": ({"strategy": "canary", "thresholds": {"speed": 1}}, "speed"),
    "smoke sessions": ({"strategy": "bluegreen", "smoke": {"sessions": 1000}}, "between 0 and"),
    "smoke fraction": ({"strategy": "bluegreen", "smoke": {"sessions": 1.5}}, "whole number"),
    "smoke command": ({"strategy": "bluegreen", "smoke": {"command": ["ls"]}}, "strings"),
    "no such strategy": ({"strategy": "yolo"}, "unknown strategy 'yolo'"),
    "not an object": ([1, 2], "must be a JSON object"),
}


@pytest.mark.parametrize("case", sorted(BAD_PLANS))
def test_bad_rollout_plans_get_a_400_with_the_reason_and_make_no_version(
    server: Server, case: str
) -> None:
    plan, reason = BAD_PLANS[case]
    headers = {"Authorization": f"Bearer {admin_token()}"}
    name = "plans-" + case.replace(" ", "-")
    created = httpx.post(f"{server.url}/api/v1/agents", json={"name": name}, headers=headers)
    assert created.status_code in (200, 201), created.text
    r = httpx.post(
        f"{server.url}/api/v1/agents/{name}/versions",
        params={"plan": json.dumps(plan)},
        content=b"not even a bundle",
        headers=headers,
    )
    assert r.status_code == 400 and reason in r.json()["detail"], r.text
    assert api_get(server, f"/agents/{name}/versions") == []


# -- with real workers --------------------------------------------------------------------------


@pytest.fixture
def agent_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "my-agent"
    shutil.copytree(AGENT_SRC, folder)
    (folder / "VERSION").write_text("one")
    (folder / "THREADS").write_text("jobs in threads: hundreds of sessions stay cheap")
    return folder


def unfinished(server: Server, markers: Path, wave: dict[str, str]) -> str:
    """What a wave's sessions that did not end were doing, for a failure message."""
    found = {j["id"]: j for j in server.jobs(limit=1000) if j["id"] in wave}
    lines = []
    for job_id in wave:
        job = found.get(job_id, {})
        if job.get("state") in ("succeeded", "failed", "terminated"):
            continue
        marks = [m for m in ("started", "done") if (markers / f"{job_id}.{m}").exists()]
        lines.append(f"{job_id}: {job or 'not in the store'}; markers: {marks}")
    return "\n".join(lines)


CASES_SRC = ROOT / "tests" / "agents" / "canary_cases"


@pytest.fixture
def cases_dir(tmp_path: Path) -> Path:
    """tests/agents/canary_cases as my-agent: files in it make a version's sessions go wrong."""
    folder = tmp_path / "my-agent"
    shutil.copytree(CASES_SRC, folder)
    return folder


def events(server: Server, kind: str, agent: str = "my-agent") -> list[dict[str, object]]:
    return [e for e in api_get(server, f"/agents/{agent}/events") if e["kind"] == kind]


@pytest.mark.timeout(420)
async def test_canary_takes_its_share_and_a_failing_canary_is_aborted_without_dropping_calls(
    start_server: Callable[..., Server], agent_dir: Path, tmp_path: Path
) -> None:
    server = start_server()
    markers = deploy_v1(server, agent_dir, tmp_path)
    (agent_dir / "VERSION").write_text("two")
    out = vf(server, agent_dir, "deploy", "--canary", "10")
    assert "canary v2 takes 10% of new sessions" in out.stdout, out.stdout

    lk = api.LiveKitAPI(server.url, DEV_KEY, DEV_SECRET)
    try:
        # 1,000 sessions in waves of 50, as callers dial in; each wave ends before the next.
        jobs: dict[str, str] = {}  # job id -> dispatch id
        began = time.monotonic()
        done: list[dict[str, object]] = []
        for start in range(0, 1000, 50):
            made = await asyncio.gather(
                *(
                    lk.agent_dispatch.create_dispatch(
                        api.CreateAgentDispatchRequest(agent_name="my-agent", room=f"r{i}")
                    )
                    for i in range(start, start + 50)
                )
            )
            wave = {d.state.jobs[0].id: d.id for d in made}
            jobs.update(wave)

            def ended(wave: dict[str, str] = wave) -> list[dict[str, object]] | None:
                found = [j for j in server.jobs(limit=100) if j["id"] in wave]
                over = [j for j in found if j["state"] in ("succeeded", "failed", "terminated")]
                return over if len(over) == len(wave) else None

            try:
                done += await wait_for(
                    ended, 120, f"sessions {start}..{start + 49} to end", interval=0.2
                )
            except AssertionError as e:
                raise AssertionError(f"{e}\n{unfinished(server, markers, wave)}") from None
        print(f"1,000 sessions took {time.monotonic() - began:.0f}s")
        errors = Counter((j["version"], j["error"]) for j in done if j["state"] != "succeeded")
        assert Counter(j["state"] for j in done) == {"succeeded": 1000}, errors
        served = Counter(j["version"] for j in done)
        # The split is a hash of the dispatch id: recompute where each was routed.
        table = RoutingTable()
        table.set_weights("my-agent", {"v1": 90, "v2": 10})
        routed = {
            j: table.choose("my-agent", "", d).version  # type: ignore[union-attr]
            for j, d in jobs.items()
        }
        # Binomial(1000, 0.1): sd 9.5; 4 sd either side is 62..138 (a 1-in-15,000 miss).
        assert 62 <= Counter(routed.values())["v2"] <= 138, served
        # Every session served elsewhere than routed is an overflow the server counted.
        moved = Counter(
            (routed[str(j["id"])], j["version"])
            for j in done
            if routed[str(j["id"])] != j["version"]
        )
        status = api_get(server, "/agents/my-agent")
        counted = {(o["routed"], o["served"]): o["sessions"] for o in status["overflow"]}
        assert dict(moved) == counted, (moved, counted)
        assert 62 <= served["v2"] <= 138 + sum(moved.values()), served
        canary = next(r for r in status["rollouts"] if r["strategy"] == "canary")
        assert canary["state"] == "progressing" and canary["weight"] == 10
        # Every session v2 served is judged; so is each one it accepted and did not start in
        # time (a failure of the canary; the job then ran elsewhere), on a loaded machine.
        judged = canary["analysis"]["canary"]
        assert judged["ended"] - judged["failed"] == served["v2"], judged
        assert {r for r, _ in judged["failure_reasons"]} <= {NOT_STARTED}, judged

        # Abort by hand: v1 takes everything again.
        aborted = vf(server, agent_dir, "canary", "abort")  # asked for, so exit 0
        assert "aborted by request" in aborted.stdout

        # Calls in flight on v1, then a canary (v3) that fails every session it gets.
        calls = [await dispatch(lk, f"long-{i}", hold=8) for i in range(6)]
        for job_id in calls:
            await wait_for(lambda j=job_id: started(markers, j), 60, f"call {job_id} to start")
        (agent_dir / "VERSION").write_text("three")
        (agent_dir / "FAIL").write_text("every session fails")
        (agent_dir / "THREADS").unlink()  # a session's process dies: not the whole worker
        out = vf(
            server, agent_dir, "deploy", "--steps", "50,100", "--interval", "1h",
            "--min-sessions", "3",
        )  # fmt: skip
        assert "canary v3 takes 50% of new sessions" in out.stdout

        def aborted() -> dict[str, Any] | None:
            latest: dict[str, Any] = api_get(server, "/agents/my-agent")["rollouts"][0]
            return latest if latest["state"] == "aborted" else None

        # Callers keep coming until the canary has ended --min-sessions and is judged: how many
        # that takes depends on the split and on the new worker's refusals while it warms up.
        probes = []
        for i in range(80):
            if aborted():
                break
            probes.append(await dispatch(lk, f"probe-{i}"))
            await asyncio.sleep(0.25)
        rollout = await wait_for(aborted, 60, "the failing canary to be aborted", interval=0.5)
        assert "canary failed" in rollout["reason"] and "new sessions go to v1" in rollout["reason"]
        assert events(server, "canary_aborted")[0]["message"] == rollout["reason"]
        status = api_get(server, "/agents/my-agent")
        assert status["deployments"][0]["version"] == "v1"
        assert status["deployments"][0]["routing"] == {"v1": 100}
        # The canary's instances drain and exit; the calls in flight on v1 all finish.
        for job_id in calls:
            job = await wait_for(job_state(server, job_id, "succeeded", "failed"), 60, job_id)
            assert job["state"] == "succeeded" and job["version"] == "v1", job
        await wait_for(
            all_stopped(server, "v3"),
            60,
            "the canary's instances to stop",
        )
        after = await dispatch(lk, "after-abort")
        job = await wait_for(job_state(server, after, "succeeded"), 60, "a session on v1")
        assert job["version"] == "v1"
        probe_states = {str(server.job(p)["state"]) for p in probes}  # type: ignore[index]
        assert probe_states <= {"succeeded", "failed"}  # each ran on v1 or failed on v3
    finally:
        await lk.aclose()


async def test_blue_green_smoke_tests_green_switches_and_blue_drains_its_calls(
    start_server: Callable[..., Server], agent_dir: Path, tmp_path: Path
) -> None:
    server = start_server()
    markers = deploy_v1(server, agent_dir, tmp_path)
    lk = api.LiveKitAPI(server.url, DEV_KEY, DEV_SECRET)
    try:
        calls = [await dispatch(lk, f"blue-{i}", until_released=True) for i in range(4)]
        for job_id in calls:
            await wait_for(lambda j=job_id: started(markers, j), 60, f"call {job_id} to start")

        (agent_dir / "VERSION").write_text("two")
        out = vf(server, agent_dir, "deploy", "--strategy", "bluegreen")
        assert "serves v2" in out.stdout, out.stdout
        smoke = [j for j in server.jobs() if str(j["room"]).startswith("vf-smoke-v2-")]
        assert len(smoke) == 3 and {j["version"] for j in smoke} == {"v2"}
        assert {j["state"] for j in smoke} == {"succeeded"}

        # Blue drains: status shows its live sessions, counting down to zero.
        shown = vf(server, agent_dir, "status").stdout
        assert "draining v1: 4 active session(s)" in shown, shown
        new = await dispatch(lk, "green-call")
        assert (await wait_for(job_state(server, new, "succeeded"), 60, "green"))["version"] == "v2"
        for job_id in calls:
            release(markers, job_id)
        for job_id in calls:
            job = await wait_for(job_state(server, job_id, "succeeded", "failed"), 60, job_id)
            assert job["state"] == "succeeded" and job["version"] == "v1", job
        await wait_for(
            all_stopped(server, "v1"),
            60,
            "blue to stop once its sessions ended",
        )

        # A green whose sessions fail never takes traffic; blue (now v2) keeps serving.
        (agent_dir / "VERSION").write_text("three")
        (agent_dir / "FAIL").write_text("every session fails")
        (agent_dir / "THREADS").unlink()  # a session's process dies: not the whole worker
        failed = vf(server, agent_dir, "deploy", "--strategy", "bluegreen", ok=False)
        assert failed.returncode == 1
        assert "smoke test of v3 failed" in failed.stderr and "v2 keeps serving" in failed.stderr
        # So does a user's smoke command that fails, on a built version (no rebuild).
        failed = vf(
            server, agent_dir, "deploy", "--version", "v1", "--strategy", "bluegreen",
            "--smoke-command", "echo 'greeting check failed' && exit 3", ok=False,
        )  # fmt: skip
        assert "smoke command exited 3: greeting check failed" in failed.stderr, failed.stderr
        status = api_get(server, "/agents/my-agent")
        assert status["deployments"][0]["version"] == "v2"
        assert status["deployments"][0]["routing"] == {"v2": 100}
        await wait_for(
            all_stopped(server, "v1", "v3"),
            30,
            "the failed greens to stop",
        )
        after = await dispatch(lk, "still-v2")
        job = await wait_for(job_state(server, after, "succeeded"), 60, "a session on v2")
        assert job["version"] == "v2"
        assert json.loads(json.dumps(events(server, "rollout_aborted")))
    finally:
        await lk.aclose()


@pytest.mark.timeout(420)
async def test_a_canary_whose_entrypoint_raises_is_aborted_within_min_sessions_naming_the_error(
    start_server: Callable[..., Server], cases_dir: Path, tmp_path: Path
) -> None:
    server = start_server()
    markers = deploy_v1(server, cases_dir, tmp_path)
    lk = api.LiveKitAPI(server.url, DEV_KEY, DEV_SECRET)
    try:
        calls = [await dispatch(lk, f"long-{i}", hold=40) for i in range(3)]
        for job_id in calls:
            await wait_for(lambda j=job_id: started(markers, j), 60, f"call {job_id} to start")
        (cases_dir / "RAISE").write_text("v2 is broken")
        out = vf(
            server, cases_dir, "deploy", "--canary", "50", "--min-sessions", "5",
            "--min-duration-ratio", "0.3",
        )  # fmt: skip
        assert "canary v2 takes 50% of new sessions" in out.stdout, out.stdout

        def latest() -> dict[str, object]:
            found: dict[str, object] = api_get(server, "/agents/my-agent")["rollouts"][0]
            return found

        # Callers dial in one after another, each call over before the next, while it runs.
        for i in range(80):
            if latest()["state"] != "progressing":
                break
            job_id = await dispatch(lk, f"call-{i}")
            await wait_for(job_state(server, job_id, "succeeded", "failed"), 60, job_id)
        rollout = await wait_for(
            lambda: (r := latest())["state"] == "aborted" and r, 30, "the canary to be aborted"
        )
        reason = str(rollout["reason"])
        on_canary = [j for j in server.jobs() if j["version"] == "v2"]
        print(f"aborted after {len(on_canary)} canary session(s): {reason}")
        thresholds = rollout["plan"]["thresholds"]  # type: ignore[index]
        assert thresholds["min_duration_ratio"] == 0.3  # the flag given
        assert thresholds["max_error_lines_increase"] == 0.5  # the server's default
        assert "RuntimeError: v2 is broken" in reason and "new sessions go to v1" in reason
        # Judged once it ended --min-sessions; the few more are the ones under way meanwhile.
        assert 5 <= len(on_canary) <= 5 + 3, (len(on_canary), reason)
        for job_id in calls:
            job = await wait_for(job_state(server, job_id, "succeeded", "failed"), 60, job_id)
            assert job["state"] == "succeeded" and job["version"] == "v1", job
        after = await dispatch(lk, "after-abort")
        job = await wait_for(job_state(server, after, "succeeded"), 60, "a session on v1")
        assert job["version"] == "v1"
        await wait_for(all_stopped(server, "v2"), 60, "the canary's instances to stop")
    finally:
        await lk.aclose()


@pytest.mark.timeout(420)
async def test_blue_green_smoke_sessions_that_raise_or_log_errors_keep_blue_serving_and_say_why(
    start_server: Callable[..., Server], cases_dir: Path, tmp_path: Path
) -> None:
    server = start_server()
    deploy_v1(server, cases_dir, tmp_path)
    # Sessions that succeed but log errors: the smoke test counts the lines and names them.
    (cases_dir / "ERROR_LINES").write_text("2")
    failed = vf(server, cases_dir, "deploy", "--strategy", "bluegreen", ok=False)
    assert failed.returncode == 1, failed.stdout
    print(failed.stderr.strip())
    assert "smoke test of v2 failed: synthetic sessions logged" in failed.stderr, failed.stderr
    assert "error line(s): could not reach the speech service (" in failed.stderr
    # Sessions whose entrypoint raises: the exception is the reason.
    (cases_dir / "ERROR_LINES").unlink()
    (cases_dir / "RAISE").write_text("v3 is broken")
    failed = vf(server, cases_dir, "deploy", "--strategy", "bluegreen", ok=False)
    assert failed.returncode == 1, failed.stdout
    print(failed.stderr.strip())
    assert "smoke test of v3 failed" in failed.stderr and "RuntimeError: v3 is broken" in (
        failed.stderr
    ), failed.stderr
    assert "v1 keeps serving" in failed.stderr
    status = api_get(server, "/agents/my-agent")
    assert status["deployments"][0]["version"] == "v1"
    assert status["deployments"][0]["routing"] == {"v1": 100}
    await wait_for(all_stopped(server, "v2", "v3"), 60, "the failed greens to stop")
    # Errors the operator allows pass: v2 again, built already, with a budget of error lines.
    vf(
        server, cases_dir, "deploy", "--version", "v2", "--strategy", "bluegreen",
        "--smoke-max-error-lines", "100",
    )  # fmt: skip
    assert api_get(server, "/agents/my-agent")["deployments"][0]["version"] == "v2"


@pytest.mark.timeout(420)
async def test_a_canary_failing_a_check_of_the_users_own_is_aborted_saying_which(
    start_server: Callable[..., Server], cases_dir: Path, tmp_path: Path
) -> None:
    server = start_server()
    markers = deploy_v1(server, cases_dir, tmp_path)
    # The check runs in v2's folder and is told the rollout's names; it reports v2 worse.
    script = (
        'test -f agent.py && test "$VF_VERSION" = v2 && test "$VF_STABLE_VERSION" = v1 '
        '&& test "$VF_AGENT" = my-agent && echo 0.9 || echo 0'
    )
    checks = tmp_path / "checks.json"
    checks.write_text(
        json.dumps(
            [
                {
                    "name": "p95-latency",
                    "command": {"argv": ["sh", "-c", script]},
                    "interval": 1,
                    "failure": "result > 0.5",
                    "failure_limit": 1,
                }
            ]
        )
    )
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"name": "x", "command": {"argv": ["true"]}, "interval": "1s"}]))
    refused = vf(server, cases_dir, "deploy", "--canary", "50", "--checks", str(bad), ok=False)
    assert refused.returncode == 1 and "check 'x': interval" in refused.stderr, refused.stderr

    lk = api.LiveKitAPI(server.url, DEV_KEY, DEV_SECRET)
    try:
        calls = [await dispatch(lk, f"long-{i}", hold=30) for i in range(2)]
        for job_id in calls:
            await wait_for(lambda j=job_id: started(markers, j), 60, f"call {job_id} to start")
        out = vf(
            server, cases_dir, "deploy", "--canary", "50", "--interval", "10m",
            "--checks", str(checks),
        )  # fmt: skip
        assert "canary v2 takes 50% of new sessions" in out.stdout, out.stdout

        def latest() -> dict[str, object]:
            found: dict[str, object] = api_get(server, "/agents/my-agent")["rollouts"][0]
            return found

        rollout = await wait_for(
            lambda: (r := latest())["state"] == "aborted" and r, 60, "the canary to be aborted"
        )
        reason = str(rollout["reason"])
        assert "check p95-latency failed 2 times (limit 1): result 0.9" in reason, reason
        assert "new sessions go to v1" in reason
        for job_id in calls:  # the calls in flight finish where they were
            job = await wait_for(job_state(server, job_id, "succeeded", "failed"), 60, job_id)
            assert job["state"] == "succeeded" and job["version"] == "v1", job
        await wait_for(all_stopped(server, "v2"), 60, "the canary's instances to stop")
    finally:
        await lk.aclose()
