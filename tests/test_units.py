"""Pure parts, no sockets: the round robin, the job state machine, token checks."""

from __future__ import annotations

import time
from pathlib import Path

import jwt
import pytest
from livekit.protocol import agent

from voicefleet.control.service import BuildLog
from voicefleet.dispatch.jobs import IllegalTransition, Job, JobBook, JobState
from voicefleet.dispatch.registry import Registry, Worker
from voicefleet.dispatch.scheduler import pick_worker
from voicefleet.errors import AuthError, PermissionDenied
from voicefleet.protocol import tokens
from voicefleet.protocol.tokens import WorkerIdentity


def pool(n: int) -> list[Worker]:
    registry = Registry()
    register = agent.RegisterWorkerRequest(agent_name="a", type=agent.JobType.JT_ROOM)
    return [
        registry.add(f"W{i}", register, api_key="k", identity=WorkerIdentity("CA", f"v{i % 2}", ""))
        for i in range(n)
    ]


def test_round_robin_goes_around_and_wraps() -> None:
    workers = pool(3)
    cursor, seen = 0, []
    for _ in range(6):
        w, cursor = pick_worker(workers, cursor, ())
        assert w is not None
        seen.append(w.id)
    assert seen == ["W0", "W1", "W2", "W0", "W1", "W2"]


def test_round_robin_skips_full_draining_disconnected_excluded_and_unrouted() -> None:
    workers = pool(5)
    workers[0].reported_full = True
    workers[1].draining = True
    workers[2].connected = False
    w, cursor = pick_worker(workers, 0, {"W3"})
    assert w is not None and w.id == "W4" and cursor == 0
    assert pick_worker(workers, 0, {"W3", "W4"}) == (None, 0)
    # Routing to v1 only: W3 (v1) is the one left once W4 (v0) is ruled out.
    w, _ = pick_worker(workers, 0, (), versions={"v1"})
    assert w is not None and w.id == "W3"


def test_a_routed_session_stays_in_its_deployment() -> None:
    workers = pool(4)  # v0, v1, v0, v1
    workers[1].deployment = "staging"
    workers[3].deployment = "production"
    # production's v1 is W3, never staging's W1; a worker naming no deployment serves any.
    assert pick_worker(workers, 0, (), {"v1"}, "production")[0] is workers[3]
    assert pick_worker(workers, 0, (), {"v1"}, "staging")[0] is workers[1]
    assert pick_worker(workers, 0, (), {"v0"}, "staging")[0] is workers[0]
    workers[3].draining = True
    assert pick_worker(workers, 0, (), {"v1"}, "production") == (None, 0)


def job(**kw: object) -> Job:
    return Job(id="AJ_1", dispatch_id="AD_1", agent_name="a", room="r", room_sid="RM", **kw)  # type: ignore[arg-type]


def test_job_state_machine_allows_forward_moves_only() -> None:
    book = JobBook()
    seen: list[tuple[JobState, JobState | None]] = []
    book.job_listeners.append(lambda j, prev: seen.append((j.state, prev)))
    j = job()
    book.add_job(j)
    with pytest.raises(IllegalTransition):
        book.transition(j, JobState.RUNNING)  # not assigned yet
    assert book.transition(j, JobState.ASSIGNED) and j.assigned_at
    assert book.transition(j, JobState.RUNNING) and j.started_at
    assert book.transition(j, JobState.FAILED, "boom") and j.error == "boom"
    assert not book.transition(j, JobState.SUCCEEDED)  # ended jobs never change
    assert j.state == JobState.FAILED
    assert [s for s, _ in seen] == [
        JobState.PENDING,
        JobState.ASSIGNED,
        JobState.RUNNING,
        JobState.FAILED,
    ]


def test_finished_jobs_leave_memory_past_the_cap() -> None:
    book = JobBook(finished_in_memory=2)
    for i in range(4):
        j = Job(id=f"AJ_{i}", dispatch_id=f"AD_{i}", agent_name="a", room="r", room_sid="RM")
        book.add_job(j)
        book.transition(j, JobState.TERMINATED)
    assert sorted(book.jobs) == ["AJ_2", "AJ_3"]


def secrets(key: str) -> str | None:
    return {"k": "s" * 32}.get(key)


def test_tokens_verify_and_say_what_is_wrong() -> None:
    good = tokens.mint("k", "s" * 32, video={"agent": True})
    claims = tokens.verify(good, secrets)
    claims.require("agent")
    with pytest.raises(PermissionDenied, match="roomAdmin"):
        claims.require("roomAdmin")
    now = int(time.time())
    cases = {
        "expired": jwt.encode({"iss": "k", "exp": now - 60}, "s" * 32, algorithm="HS256"),
        "lacks the 'exp' claim": jwt.encode({"iss": "k"}, "s" * 32, algorithm="HS256"),
        "no issuer": jwt.encode({"exp": now + 60}, "s" * 32, algorithm="HS256"),
        "unknown API key": tokens.mint("other", "x" * 32, video={}),
        "malformed": "a.b",
    }
    for reason, token in cases.items():
        with pytest.raises(AuthError, match=reason):
            tokens.verify(token, secrets)


def test_grants_count_only_when_true_and_admin_is_the_agent_admin_grant() -> None:
    def claims(**extra: object) -> tokens.Claims:
        video = extra.pop("video", {})
        return tokens.verify(tokens.mint("k", "s" * 32, video=video, **extra), secrets)  # type: ignore[arg-type]

    for truthy in ("false", "true", 1, ["x"], {"a": 1}):
        with pytest.raises(PermissionDenied, match="roomAdmin"):
            claims(video={"roomAdmin": truthy, "room": "r"}).require("roomAdmin", "r")
        with pytest.raises(PermissionDenied, match="agent admin"):
            claims(agent={"admin": truthy}).require_admin()
    claims(video={"roomAdmin": True, "room": "r"}).require("roomAdmin", "r")
    with pytest.raises(PermissionDenied, match="not for room"):
        claims(video={"roomAdmin": True, "room": "r"}).require("roomAdmin", "other")
    for not_admin in ({"video": {"roomAdmin": True}}, {"agent": True}, {"agent": {}}):
        with pytest.raises(PermissionDenied, match="agent admin"):
            claims(**not_admin).require_admin()
    tokens.verify(tokens.mint_admin("k", "s" * 32), secrets).require_admin()


def test_worker_token_round_trip_and_forgery() -> None:
    identity = WorkerIdentity(agent="CA_1", version="v3", instance="i-1")
    token = tokens.mint_worker_token("s" * 32, identity)
    assert tokens.verify_worker_token(token, "s" * 32) == identity
    with pytest.raises(AuthError):
        tokens.verify_worker_token(token, "t" * 32)


def test_a_build_log_that_cannot_be_written_stops_the_log_and_says_why_never_the_build(
    tmp_path: Path,
) -> None:
    # /dev/full opens, then refuses every write with ENOSPC, as a full disk does.
    with BuildLog(Path("/dev/full")) as full:
        full.write("resolving dependencies")  # raises nothing
        full.write("version v1 is ready")
    assert "No space left on device" in full.error
    with BuildLog(tmp_path / "no-such-dir" / "build.log") as missing:
        missing.write("a line")
    assert "No such file or directory" in missing.error
    with BuildLog(tmp_path / "build.log") as fine:
        fine.write("a line")
    assert fine.error == "" and (tmp_path / "build.log").read_text() == "a line\n"
