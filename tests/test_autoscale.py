"""Autoscaling with real workers: a `vf server`, tests/agents/deployable deployed with
`vf agent deploy`, sessions dispatched with the real livekit-api client.

The agent reports load by sessions (LOAD_SESSIONS=5: 5 sessions are load 1.0) and turns FULL at
LOAD_THRESHOLD=0.75, i.e. with 4 sessions. The policy aims at load 0.5 per instance, so a third
session on an instance (load 0.6) must bring a second instance up before any worker is FULL.
(The pure decisions are unit-tested in test_autoscale_policy.py.)
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from livekit import api

from tests.support import DEV_KEY, DEV_SECRET, ROOT, Server, started, wait_for
from tests.test_deploy import AGENT_SRC, api_get, dispatch, job_state, vf


@pytest.fixture
def agent_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "my-agent"
    shutil.copytree(AGENT_SRC, folder)
    return folder


def instances(server: Server, *statuses: str, agent: str = "my-agent") -> list[dict[str, object]]:
    found = api_get(server, f"/agents/{agent}")["instances"]
    return [i for i in found if not statuses or i["status"] in statuses]


def autoscale_events(server: Server, agent: str = "my-agent") -> list[dict[str, object]]:
    found = api_get(server, f"/agents/{agent}/events")
    return sorted(
        (e for e in found if str(e["kind"]).startswith("autoscaled_")), key=lambda e: e["at"]
    )


async def deploy_autoscaled(server: Server, agent_dir: Path, markers: Path, *policy: str) -> None:
    vf(server, agent_dir, "create")
    vf(
        server, agent_dir, "secrets", "set", f"MARKER_DIR={markers}",
        "LOAD_SESSIONS=5", "LOAD_THRESHOLD=0.75",
    )  # fmt: skip
    vf(server, agent_dir, "deploy")
    vf(server, agent_dir, "scale", *policy)


async def test_scales_up_before_workers_are_full_and_down_slowly_draining_idle_first(
    start_server: Callable[..., Server], agent_dir: Path, tmp_path: Path
) -> None:
    server = start_server()
    markers = tmp_path / "markers"
    markers.mkdir()
    down_window = 8.0
    await deploy_autoscaled(
        server, agent_dir, markers,
        "--min", "1", "--max", "3", "--up-window", "1s", "--down-window", f"{down_window:g}s",
    )  # fmt: skip
    [first] = instances(server, "ready", "starting")
    lk = api.LiveKitAPI(server.url, DEV_KEY, DEV_SECRET)
    try:
        # A ramp: one session at a time, each held long enough to be counted.
        calls = []
        for i in range(3):
            calls.append(await dispatch(lk, f"ramp-{i}", hold=30 if i == 0 else 10))
            await wait_for(lambda j=calls[-1]: started(markers, j), 60, f"session {i} to start")
        full_seen = []

        def second_serving() -> bool:
            full_seen.extend(w for w in server.workers("my-agent") if w["status"] == "full")
            return len([i for i in instances(server) if i["registered"]]) == 2

        await wait_for(second_serving, 60, "a second instance", interval=0.1)
        assert full_seen == [], "a worker turned FULL before the autoscaler added capacity"
        up = autoscale_events(server)[0]
        assert up["kind"] == "autoscaled_up" and "1 -> 2" in str(up["message"]), up
        # Decided on the worker's own report: 3 sessions, load 0.6, above the target and
        # below FULL (4 sessions, 0.8).
        assert "load 0.60 / target 0.5" in str(up["message"]), up

        # The two short calls end; the long one holds the first instance. Load falls to 0.2:
        # one instance is enough, but only after the down window, and the idle one goes.
        ended = [await wait_for(job_state(server, j, "succeeded"), 60, j) for j in calls[1:]]
        # When the load fell, by the server's own clock (the test may notice it later).
        dropped_at = max(float(job["ended_at"]) for job in ended)
        await wait_for(
            lambda: any(e["kind"] == "autoscaled_down" for e in autoscale_events(server)),
            60,
            "the scale-down",
            interval=0.2,
        )
        down = next(e for e in autoscale_events(server) if e["kind"] == "autoscaled_down")
        # Not before the down window: the autoscaler sees the lower load only after the ends.
        assert float(down["at"]) - dropped_at >= down_window - 0.5, (down, dropped_at)  # type: ignore[arg-type]
        second = next(i for i in instances(server) if i["id"] != first["id"])
        assert str(second["id"]) in str(down["message"])  # the idle instance, not the busy one
        assert next(i for i in instances(server) if i["id"] == first["id"])["status"] == "ready"
        job = await wait_for(job_state(server, calls[0], "succeeded", "failed"), 60, calls[0])
        assert job["state"] == "succeeded" and job["instance"] == first["id"]
        await wait_for(
            lambda: (
                [i["status"] for i in instances(server) if i["id"] == second["id"]] == ["stopped"]
            ),
            30,
            "the idle instance to stop",
        )
    finally:
        await lk.aclose()


async def test_scale_to_zero_cold_start_and_a_spike_beyond_max_queues_without_dropping(
    start_server: Callable[..., Server], agent_dir: Path, tmp_path: Path
) -> None:
    server = start_server()
    markers = tmp_path / "markers"
    markers.mkdir()
    await deploy_autoscaled(
        server, agent_dir, markers,
        "--min", "0", "--max", "2", "--idle-to-zero", "2s", "--up-window", "1s",
        "--down-window", "30s",
    )  # fmt: skip
    await wait_for(lambda: instances(server, "ready", "starting") == [], 60, "scale to zero")
    assert any("scale to zero" in str(e["message"]) for e in autoscale_events(server))

    lk = api.LiveKitAPI(server.url, DEV_KEY, DEV_SECRET)
    try:
        cold = await dispatch(lk, "cold")
        job = await wait_for(job_state(server, cold, "succeeded", "failed"), 90, "cold start")
        assert job["state"] == "succeeded", job
        assert started(markers, cold) is not None  # the entrypoint ran
        up = autoscale_events(server)[-1]
        assert "cold start" in str(up["message"]), up

        # Back to zero, then a spike: 12 sessions at once for at most 2 instances. They queue
        # (nothing runs), the autoscaler asks for more than its max and says so.
        await wait_for(lambda: instances(server, "ready", "starting") == [], 60, "zero again")
        spike = await asyncio.gather(*(dispatch(lk, f"spike-{i}", hold=4) for i in range(12)))
        capped = await wait_for(
            lambda: [e for e in autoscale_events(server) if "capped at max 2" in str(e["message"])],
            60,
            "the autoscaler to report the cap",
            interval=0.2,
        )
        assert "-> 2 instance(s)" in str(capped[0]["message"]), capped
        for job_id in spike:
            job = await wait_for(job_state(server, job_id, "succeeded", "failed"), 120, job_id)
            assert job["state"] == "succeeded", job
        targets = [
            int(re.search(r"-> (\d+) instance", str(e["message"])).group(1))  # type: ignore[union-attr]
            for e in autoscale_events(server)
        ]
        assert max(targets) == 2, targets  # never beyond max
    finally:
        await lk.aclose()


async def test_a_version_whose_sessions_crash_is_not_scaled_up_to_crash_more(
    start_server: Callable[..., Server], tmp_path: Path
) -> None:
    server = start_server()
    folder = tmp_path / "my-agent"
    shutil.copytree(ROOT / "tests" / "agents" / "canary_cases", folder)
    markers = tmp_path / "markers"
    markers.mkdir()
    await deploy_autoscaled(
        server, folder, markers, "--min", "1", "--max", "3", "--up-window", "1s",
    )  # fmt: skip
    lk = api.LiveKitAPI(server.url, DEV_KEY, DEV_SECRET)
    try:
        # Six sessions whose job process dies, one after another (load stays low meanwhile).
        for i in range(6):
            made = await lk.agent_dispatch.create_dispatch(
                api.CreateAgentDispatchRequest(
                    agent_name="my-agent", room=f"crash-{i}", metadata=json.dumps({"exit": 1})
                )
            )
            job_id = made.state.jobs[0].id
            job = await wait_for(job_state(server, job_id, "succeeded", "failed"), 60, job_id)
            assert job["state"] == "failed", job
        # Then load that would ask for a second instance (3 sessions: 0.6 at target 0.5).
        calls = [await dispatch(lk, f"held-{i}", hold=20) for i in range(3)]
        for job_id in calls:
            await wait_for(lambda j=job_id: started(markers, j), 60, f"session {job_id} to start")

        def held_events() -> list[dict[str, object]]:
            found = api_get(server, "/agents/my-agent/events")
            return [e for e in found if e["kind"] == "autoscale_held"]

        held = await wait_for(
            held_events, 60, "the autoscaler to hold the failing version", interval=0.2
        )
        message = str(held[0]["message"])
        assert "v1 not scaled up (1 -> 2 wanted" in message, message
        assert "6/6 recent sessions failed (100%)" in message, message

        # Still held a few decisions later (the load has not changed), and said only once.
        def later_decision() -> dict[str, object] | None:
            decision = api_get(server, "/agents/my-agent")["deployments"][0]["decision"]
            held_at = float(str(held[0]["at"]))
            return decision if decision and decision["at"] > held_at + 3 else None

        decision = await wait_for(later_decision, 60, "later decisions", interval=0.2)
        assert str(decision["reason"]).startswith("holding at 1, not scaling up to 2"), decision
        assert len(held_events()) == 1
        assert [e for e in autoscale_events(server) if e["kind"] == "autoscaled_up"] == []
        assert len(instances(server, "ready", "starting")) == 1
    finally:
        await lk.aclose()
