"""The dispatcher against real livekit-agents 1.8.9 workers (tests/agents/marker_agent.py)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import jwt
from livekit import api
from livekit.protocol.agent_dispatch import JobRestartPolicy

from tests.support import (
    DEV_SECRET,
    Server,
    Worker,
    job_in,
    ran_to_its_end,
    release,
    started,
    wait_for,
)


async def dispatch(
    lk: api.LiveKitAPI,
    agent: str,
    room: str,
    hold: float = 0,
    *,
    until_released: bool = False,
    restart_policy: int = JobRestartPolicy.JRP_ON_FAILURE,
) -> str:
    """CreateDispatch through the real livekit-api client; return the job id."""
    d = await lk.agent_dispatch.create_dispatch(
        api.CreateAgentDispatchRequest(
            agent_name=agent,
            room=room,
            metadata=json.dumps({"hold": hold, "until_released": until_released}),
            restart_policy=restart_policy,  # type: ignore[arg-type]
        )
    )
    assert len(d.state.jobs) == 1
    return d.state.jobs[0].id


async def workers_ready(*workers: Worker) -> list[str]:
    return list(await asyncio.gather(*(w.registered() for w in workers)))


async def test_worker_registers_and_a_dispatched_job_runs_with_a_room_token(
    server: Server, lkapi: api.LiveKitAPI, start_worker: Callable[..., Worker], markers: Path
) -> None:
    worker = start_worker(server, "reg")
    worker_id = await worker.registered()
    [listed] = server.workers("reg")
    assert listed["id"] == worker_id
    assert listed["sdk_version"] == "1.8.9"
    assert listed["pool"] == "unmanaged"

    job_id = await dispatch(lkapi, "reg", "room-reg")
    marker = await wait_for(lambda: started(markers, job_id), 30, "the entrypoint to run")
    assert marker["room"] == "room-reg"
    assert marker["worker_pgid"] == worker.pid
    claims = jwt.decode(marker["token"], DEV_SECRET, algorithms=["HS256"])
    assert claims["sub"] == f"agent-{job_id}"
    assert claims["video"]["room"] == "room-reg"
    assert claims["video"]["roomJoin"] is True
    assert claims["attributes"]["lk.agent_name"] == "reg"

    # Succeeded, or failed with no reason when livekit-agents misreads its process's exit
    # status (see ran_to_its_end): the worker's report, recorded as it came.
    job = await ran_to_its_end(server, markers, job_id)
    assert job["worker_id"] == worker_id
    assert job["participant_identity"] == f"agent-{job_id}"


async def test_dispatches_across_three_workers_land_round_robin(
    server: Server, lkapi: api.LiveKitAPI, start_worker: Callable[..., Worker]
) -> None:
    ids = await workers_ready(*(start_worker(server, "rr") for _ in range(3)))
    order = []
    for i in range(9):
        # One at a time: livekit-agents may refuse an offer that overlaps another it is still
        # reserving a process for, and a refusal rightly moves the job to the next worker.
        job = await job_in(
            server, await dispatch(lkapi, "rr", f"room-rr-{i}", hold=5), "running", "succeeded"
        )
        order.append(job["worker_id"])
    assert Counter(order) == dict.fromkeys(ids, 3)
    # Consecutive jobs never land on the same worker: the rotation goes through all three.
    assert all(len(set(order[i : i + 3])) == 3 for i in range(0, 9, 3)), order


async def test_worker_whose_request_fnc_rejects_passes_the_job_to_the_next(
    server: Server, lkapi: api.LiveKitAPI, start_worker: Callable[..., Worker], markers: Path
) -> None:
    refusing = start_worker(server, "reject", REJECT_JOBS="1")
    refusing_id = await refusing.registered()
    taking_id = await start_worker(server, "reject").registered()
    refused_before = server.metric("voicefleet_offers_total", outcome="refused")

    job_ids = [await dispatch(lkapi, "reject", f"room-reject-{i}") for i in range(4)]
    for job_id in job_ids:
        job = await ran_to_its_end(server, markers, job_id)
        assert job["worker_id"] == taking_id
    assert server.metric("voicefleet_offers_total", outcome="refused") > refused_before
    assert not any(started(markers, j) and started(markers, j)["worker_pgid"] == refusing.pid
                   for j in job_ids)  # fmt: skip
    assert refusing_id not in {j["worker_id"] for j in server.jobs()}


async def test_worker_that_rejects_for_good_terminates_the_job_as_livekit_does(
    server: Server, lkapi: api.LiveKitAPI, start_worker: Callable[..., Worker], markers: Path
) -> None:
    # livekit-agents' JobRequest.reject() defaults to terminate=True: "the job will not be
    # assigned to another worker". The server must honour that, not pass the job on.
    rejecting_id = await start_worker(server, "terminate", REJECT_JOBS="terminate").registered()
    other = start_worker(server, "terminate")
    await other.registered()
    job_id = await dispatch(lkapi, "terminate-x", "room-none")  # no worker: stays pending
    assert (await job_in(server, job_id, "pending"))["state"] == "pending"
    for i in range(2):
        job_id = await dispatch(lkapi, "terminate", f"room-term-{i}")
        job = await job_in(server, job_id, "terminated", "succeeded", "failed")
        if job["state"] == "terminated":
            assert rejecting_id in job["error"]
            assert job["worker_id"] == ""
            break
        await ran_to_its_end(server, markers, job_id)  # taken by the other worker
    else:
        raise AssertionError("no job was offered to the rejecting worker")


async def test_full_worker_is_skipped(
    server: Server, lkapi: api.LiveKitAPI, start_worker: Callable[..., Worker], markers: Path
) -> None:
    small = start_worker(server, "full", MAX_JOBS="1")
    small_id = await small.registered()
    busy_job = await dispatch(lkapi, "full", "room-full-busy", hold=60)
    await job_in(server, busy_job, "running")
    # The worker reports FULL with its next status update (every 2.5 s).
    await wait_for(
        lambda: server.workers("full")[0]["status"] == "full", 20, "the worker to report FULL"
    )
    other_id = await start_worker(server, "full").registered()

    job_ids = [await dispatch(lkapi, "full", f"room-full-{i}") for i in range(3)]
    for job_id in job_ids:
        assert (await ran_to_its_end(server, markers, job_id))["worker_id"] == other_id
    assert (await job_in(server, busy_job, "running"))["worker_id"] == small_id


async def test_sigterm_mid_session_finishes_the_session_and_takes_no_new_jobs(
    server: Server, lkapi: api.LiveKitAPI, start_worker: Callable[..., Worker], markers: Path
) -> None:
    leaving = start_worker(server, "term")
    leaving_id = await leaving.registered()
    in_flight = await dispatch(lkapi, "term", "room-term-call", hold=6)
    await wait_for(lambda: started(markers, in_flight), 30, "the call to start")
    staying_id = await start_worker(server, "term").registered()

    leaving.sigterm()
    await wait_for(
        lambda: any(w["id"] == leaving_id and w["status"] != "available"
                    for w in server.workers("term")) or leaving.proc.poll() is not None,
        20,
        "the SIGTERMed worker to stop taking jobs",
    )  # fmt: skip
    new_jobs = [await dispatch(lkapi, "term", f"room-term-{i}") for i in range(3)]
    for job_id in new_jobs:
        assert (await ran_to_its_end(server, markers, job_id))["worker_id"] == staying_id

    # Not cut: its entrypoint finished, on the worker that left, and the job did not fail for
    # the worker leaving ("disconnected while the job was running").
    call = await ran_to_its_end(server, markers, in_flight)
    assert call["worker_id"] == leaving_id
    assert leaving.proc.wait(30) == 0


async def test_kill9_mid_session_dispatches_the_job_again_to_another_worker(
    server: Server, lkapi: api.LiveKitAPI, start_worker: Callable[..., Worker], markers: Path
) -> None:
    doomed = start_worker(server, "again")
    await doomed.registered()
    in_flight = await dispatch(lkapi, "again", "room-again-call", until_released=True)
    await wait_for(lambda: started(markers, in_flight), 30, "the call to start")
    survivor = start_worker(server, "again")
    survivor_id = await survivor.registered()

    doomed.kill9()
    # The same job (same id, same room) starts again on the other worker, once the dead one
    # has had its grace to reconnect and claim it (an unmanaged worker: no process to watch).
    await wait_for(
        lambda: (m := started(markers, in_flight)) is not None and m["worker_pgid"] == survivor.pid,
        30,
        "the call to start again on the surviving worker",
    )
    job = await job_in(server, in_flight, "running")
    assert job["worker_id"] == survivor_id
    assert job["room"] == "room-again-call"
    assert job["redispatches"] == 1
    assert server.metric("voicefleet_jobs_redispatched_total") >= 1
    release(markers, in_flight)
    assert (await ran_to_its_end(server, markers, in_flight))["worker_id"] == survivor_id


async def test_kill9_mid_session_with_jrp_never_fails_the_job_and_never_offers_it_again(
    server: Server, lkapi: api.LiveKitAPI, start_worker: Callable[..., Worker], markers: Path
) -> None:
    doomed = start_worker(server, "kill")
    doomed_id = await doomed.registered()
    in_flight = await dispatch(
        lkapi, "kill", "room-kill-call", hold=60, restart_policy=JobRestartPolicy.JRP_NEVER
    )
    await wait_for(lambda: started(markers, in_flight), 30, "the call to start")
    survivor_id = await start_worker(server, "kill").registered()

    doomed.kill9()
    failed = await job_in(server, in_flight, "failed")
    assert doomed_id in failed["error"] and "disconnected" in failed["error"]
    assert failed["redispatches"] == 0
    await wait_for(lambda: all(w["id"] != doomed_id for w in server.workers()), 10, "removal")

    new_jobs = [await dispatch(lkapi, "kill", f"room-kill-{i}") for i in range(3)]
    for job_id in new_jobs:
        assert (await ran_to_its_end(server, markers, job_id))["worker_id"] == survivor_id
    # Never offered again: it did not start on the survivor.
    assert started(markers, in_flight)["worker_pgid"] == doomed.pid  # type: ignore[index]


async def test_job_waits_in_the_queue_until_a_worker_arrives(
    server: Server, lkapi: api.LiveKitAPI, start_worker: Callable[..., Worker], markers: Path
) -> None:
    job_id = await dispatch(lkapi, "late", "room-late")
    assert (await job_in(server, job_id, "pending"))["worker_id"] == ""
    # No worker has registered as "late" yet: a name callers choose is no metric label.
    assert server.metric("voicefleet_queued_jobs", agent_name="late") == 0
    assert server.metric("voicefleet_queued_jobs", agent_name="(unknown)") >= 1

    worker_id = await start_worker(server, "late").registered()
    job = await ran_to_its_end(server, markers, job_id)
    assert job["worker_id"] == worker_id


async def test_a_dispatch_answered_survives_a_kill9_of_the_server_at_once(
    start_server: Callable[..., Server], tmp_path: Path
) -> None:
    """A dispatch the caller got an answer for is in the store: a crash right after (kill -9,
    no shutdown, before the history's next batch) loses none, and the next start queues them.
    Found by the soak (benchmarks/soak): a session dispatched 0.3 s before the kill was lost."""
    server = start_server(data_dir=tmp_path / "data")
    port = int(server.url.rsplit(":", 1)[1])
    lk = api.LiveKitAPI(server.url, "devkey", DEV_SECRET)
    try:
        jobs = [await dispatch(lk, "nobody-yet", f"crash-{i}") for i in range(5)]
    finally:
        await lk.aclose()
    assert server.proc is not None
    server.proc.kill()  # at once: no flush on the way out
    server.proc.wait()

    again = start_server(data_dir=tmp_path / "data", port=port)
    for job_id in jobs:
        job = again.job(job_id)
        assert job is not None, f"{job_id} was answered, then lost in the crash"
        assert job["state"] == "pending", job  # queued again: no worker for it yet
