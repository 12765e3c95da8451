"""Job history lives in the store: it survives a restart, and queued jobs are queued again."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from livekit import api
from livekit.protocol import agent

from tests.peers import Peer
from tests.support import DEV_KEY, DEV_SECRET, Server, wait_for


async def test_history_survives_a_restart_and_a_pending_job_is_dispatched_after_it(
    start_server: Callable[..., Server], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    server = start_server(data_dir=data)
    peer = await Peer.connect(server.ws_url, "recorded")
    lk = api.LiveKitAPI(server.url, DEV_KEY, DEV_SECRET)
    try:
        done = [
            (await lk.agent_dispatch.create_dispatch(
                api.CreateAgentDispatchRequest(agent_name="recorded", room=f"done-{i}")
            )).state.jobs[0].id
            for i in range(3)
        ]  # fmt: skip
        for job_id in done:
            await wait_for(
                lambda j=job_id: (x := server.job(j)) and x["state"] == "succeeded", 10, "success"
            )
        waiting = (
            (
                await lk.agent_dispatch.create_dispatch(
                    api.CreateAgentDispatchRequest(agent_name="late-comer", room="waiting-room")
                )
            )
            .state.jobs[0]
            .id
        )
        await wait_for(lambda: server.job(waiting), 10, "the pending job in the store")
    finally:
        await lk.aclose()
        await peer.close()
    server.stop()

    again = start_server(data_dir=data)
    for job_id in done:
        job = again.job(job_id)
        assert job is not None and job["state"] == "succeeded" and job["worker_id"]
    assert again.job(waiting)["state"] == "pending"  # type: ignore[index]

    late = await Peer.connect(again.ws_url, "late-comer")
    try:
        job = await wait_for(
            lambda: (j := again.job(waiting)) and j["state"] == "succeeded" and j,
            15,
            "the pending job to run after the restart",
        )
        assert job["worker_id"] == late.worker_id
    finally:
        await late.close()
    lk = api.LiveKitAPI(again.url, DEV_KEY, DEV_SECRET)
    try:
        [d] = await lk.agent_dispatch.list_dispatch("waiting-room")
        assert d.state.jobs[0].id == waiting
    finally:
        await lk.aclose()


async def test_a_call_that_ends_while_the_server_is_down_is_recorded_as_it_ended(
    start_server: Callable[..., Server], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    server = start_server(data_dir=data)
    peer = await Peer.connect(server.ws_url, "through-restart")
    peer.end_jobs = False
    lk = api.LiveKitAPI(server.url, DEV_KEY, DEV_SECRET)
    try:
        d = await lk.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(agent_name="through-restart", room="long-call")
        )
    finally:
        await lk.aclose()
    job_id = d.state.jobs[0].id
    await wait_for(lambda: (j := server.job(job_id)) and j["state"] == "running", 10, "running")
    port = int(server.url.rsplit(":", 1)[1])
    server.stop()
    await peer.close()

    # The call ends while the server is down. livekit-agents queues the update and sends it on
    # reconnecting, right after `register`, before it reports its remaining jobs (migrate_job).
    again = start_server(data_dir=data, port=port)
    back = await Peer.connect(again.ws_url, "through-restart")
    try:
        await back.update(job_id, agent.JobStatus.JS_SUCCESS)
        job = await wait_for(
            lambda: (j := again.job(job_id)) and j["state"] != "running" and j,
            10,  # not the 30 s after which an unreported job is failed
            "the job to end",
        )
        assert job["state"] == "succeeded" and job["worker_id"] == back.worker_id, job
    finally:
        await back.close()
