"""Every rollout strategy with Node.js agents: canary, blue-green with a smoke test, autoscaling
to zero with a cold start, on real @livekit/agents 1.9 workers deployed by `vf agent deploy`.

The agent is tests/test_node_agents.py's (examples/node_agent with an agent.js that writes
markers and throws when a file FAIL is beside it). The tests share one server, each with its own
agent name (its folder's name); the agents have the same lockfile, so node_modules is installed
once per run. The server disconnects a worker silent for 5 s (30 by default): calls in flight on
a draining Node.js instance last longer than that, and must still finish where they began.
Rolling deploys and rollback: tests/test_node_agents.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from livekit import api

from tests.support import Server, started, wait_for
from tests.test_autoscale import autoscale_events, deploy_autoscaled, instances
from tests.test_deploy import api_get, deploy_v1, job_state, vf
from tests.test_node_agents import AGENT_JS, dispatch, marker, node_agent
from tests.test_rollouts import events

pytestmark = pytest.mark.timeout(600)  # the first Node.js build runs npm ci
SILENCE = 5.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("server"), "--worker-silence-timeout", f"{SILENCE:g}")
    yield srv.start()
    srv.stop()


def serving_only(server: Server, agent: str, version: str) -> Callable[[], bool]:
    """A check: the instances of `agent` that serve or start are all of `version`. (Drained
    Node.js instances may take a while to exit: @livekit/agents 1.9 waits up to a minute for
    job processes that were still starting when it was told to stop.)"""

    def check() -> bool:
        serving = instances(server, "ready", "starting", agent=agent)
        return {str(i["version"]) for i in serving} == {version}

    return check


def rollout(server: Server, agent: str) -> Callable[[], dict[str, Any]]:
    return lambda: api_get(server, f"/agents/{agent}")["rollouts"][0]


async def calls_in_flight(
    lk: api.LiveKitAPI, agent: str, markers: Path, n: int, hold: float
) -> dict[str, dict[str, Any]]:
    """`n` sessions of `agent` holding `hold` seconds, once each has started: their markers."""
    calls = [await dispatch(lk, agent, f"{agent}-long-{i}", hold=hold) for i in range(n)]
    return {j: await wait_for(marker(markers, j, "started"), 60, f"call {j}") for j in calls}


async def finished_where_they_began(
    server: Server, markers: Path, calls: dict[str, dict[str, Any]]
) -> None:
    """Each call ran to its end in the process it began in, and the store says it succeeded."""
    for job_id, began in calls.items():
        done = await wait_for(marker(markers, job_id, "done"), 60, f"call {job_id} to end")
        assert (done["version"], done["pid"]) == (began["version"], began["pid"]), done
        job = await wait_for(job_state(server, job_id, "succeeded", "failed"), 30, job_id)
        assert job["state"] == "succeeded" and job["version"] == began["version"], job
        assert job["redispatches"] == 0, job


async def test_a_node_canary_takes_its_share_and_one_whose_sessions_throw_is_aborted(
    server: Server, lkapi: api.LiveKitAPI, tmp_path: Path
) -> None:
    agent = "node-canary"
    folder = node_agent(tmp_path / agent)
    markers = deploy_v1(server, folder, tmp_path)
    calls = await calls_in_flight(lkapi, agent, markers, 2, hold=20)
    assert {c["version"] for c in calls.values()} == {"v1"}

    # v2 takes half of new sessions: sessions on both sides, all ended well.
    (folder / "agent.js").write_text(AGENT_JS.replace("'one'", "'two'"))
    out = vf(server, folder, "deploy", "--canary", "50", "--interval", "1h")
    assert "canary v2 takes 50% of new sessions" in out.stdout, out.stdout
    both, ran = [], []
    for i in range(20):  # callers one after another until both sides served (2^-19 to miss);
        # a burst on a canary just started would be slow to start: judged so
        both.append(await dispatch(lkapi, agent, f"{agent}-split-{i}"))
        ran.append(await wait_for(marker(markers, both[-1], "done"), 60, f"session {i}"))
        if len({r["version"] for r in ran}) == 2:
            break
    assert {(r["version"], r["source"]) for r in ran} == {("v1", "one"), ("v2", "two")}, ran
    for job_id, r in zip(both, ran, strict=True):
        job = await wait_for(job_state(server, job_id, "succeeded", "failed"), 30, job_id)
        assert (job["state"], job["version"]) == ("succeeded", r["version"]), job
    assert "aborted by request" in vf(server, folder, "canary", "abort").stdout

    # v3's sessions throw: the canary is taken out on its own, naming the error.
    (folder / "FAIL").write_text("v3 is broken")
    vf(server, folder, "deploy", "--steps", "50,100", "--interval", "1h", "--min-sessions", "3")
    for i in range(40):
        if rollout(server, agent)()["state"] != "progressing":
            break
        job_id = await dispatch(lkapi, agent, f"{agent}-probe-{i}")
        await wait_for(job_state(server, job_id, "succeeded", "failed"), 60, job_id)
    aborted = await wait_for(
        lambda: (r := rollout(server, agent)())["state"] == "aborted" and r, 30, "the abort"
    )
    reason = str(aborted["reason"])
    assert "new sessions go to v1" in reason and "by request" not in reason, reason
    # Its sessions failed with the error their entry threw, as the instance reported them...
    ended = [
        (j["state"], j["error"])
        for j in server.jobs()
        if j["agent_name"] == agent
        and j["version"] == "v3"
        and j["state"] in ("succeeded", "failed")
    ]
    assert ended and set(ended) == {("failed", "Error: v3 is broken")}, ended
    # ... which the verdict names, unless the canary's slow starts were judged first (its job
    # processes were still starting; sessions that fail use them up faster).
    assert "failed" in reason or "from assignment to running" in reason, reason
    if "canary failed" in reason:
        assert "Error: v3 is broken" in reason, reason
    assert events(server, "canary_aborted", agent)[0]["message"] == reason
    status = api_get(server, f"/agents/{agent}")
    assert status["deployments"][0]["routing"] == {"v1": 100}

    # The calls in flight on v1 all along finished; the canaries' instances drain away.
    await finished_where_they_began(server, markers, calls)
    await wait_for(serving_only(server, agent, "v1"), 30, "the canaries to drain")
    after = await dispatch(lkapi, agent, f"{agent}-after")
    assert (await wait_for(marker(markers, after, "done"), 60, "after"))["version"] == "v1"


async def test_node_blue_green_switches_after_its_smoke_test_and_a_failing_one_gets_no_traffic(
    server: Server, lkapi: api.LiveKitAPI, tmp_path: Path
) -> None:
    agent = "node-bluegreen"
    folder = node_agent(tmp_path / agent)
    markers = deploy_v1(server, folder, tmp_path)
    # Long enough to outlast green's start and smoke test: blue drains with them (silent
    # @livekit/agents workers would be disconnected then).
    calls = await calls_in_flight(lkapi, agent, markers, 2, hold=12 * SILENCE)

    # Green (v2) passes its smoke sessions, then takes every new session; blue drains.
    out = vf(server, folder, "deploy", "--strategy", "bluegreen")
    assert "serves v2" in out.stdout, out.stdout
    assert not any((markers / f"{j}.done").exists() for j in calls)  # blue drains with them
    smoke = [j for j in server.jobs() if str(j["room"]).startswith("vf-smoke-v2-")]
    assert len(smoke) == 3 and {(j["version"], j["state"]) for j in smoke} == {
        ("v2", "succeeded")
    }, smoke
    new = await dispatch(lkapi, agent, f"{agent}-green")
    assert (await wait_for(marker(markers, new, "done"), 60, "green"))["version"] == "v2"

    # A green whose sessions throw fails its smoke test: it never gets a caller's session.
    (folder / "FAIL").write_text("v3 is broken")
    failed = vf(server, folder, "deploy", "--strategy", "bluegreen", ok=False)
    assert failed.returncode == 1, failed.stdout
    assert "smoke test of v3 failed" in failed.stderr, failed.stderr
    assert "Error: v3 is broken" in failed.stderr and "v2 keeps serving" in failed.stderr
    on_v3 = [j for j in server.jobs() if j["agent_name"] == agent and j["version"] == "v3"]
    assert on_v3 and all(str(j["room"]).startswith("vf-smoke-v3-") for j in on_v3), on_v3
    assert api_get(server, f"/agents/{agent}")["deployments"][0]["routing"] == {"v2": 100}
    still = await dispatch(lkapi, agent, f"{agent}-still-green")
    assert (await wait_for(marker(markers, still, "done"), 60, "still v2"))["version"] == "v2"

    # Blue's calls, in flight through both deploys (blue draining meanwhile), ran to their ends.
    await finished_where_they_began(server, markers, calls)
    await wait_for(serving_only(server, agent, "v2"), 30, "blue and v3 to drain")


async def test_a_node_agent_scales_to_zero_and_a_dispatch_cold_starts_it(
    server: Server, lkapi: api.LiveKitAPI, tmp_path: Path
) -> None:
    agent = "node-autoscaled"
    folder = node_agent(tmp_path / agent)
    markers = tmp_path / "markers"
    markers.mkdir()
    await deploy_autoscaled(
        server, folder, markers,
        "--min", "0", "--max", "1", "--idle-to-zero", "2s", "--up-window", "1s",
        "--down-window", "30s",
    )  # fmt: skip

    def at_zero() -> bool:
        return instances(server, "ready", "starting", agent=agent) == []

    await wait_for(at_zero, 60, "scale to zero")
    cold = await dispatch(lkapi, agent, f"{agent}-cold", hold=3)
    ran = await wait_for(marker(markers, cold, "done"), 90, "the cold-started session")
    assert ran["version"] == "v1", ran
    job = await wait_for(job_state(server, cold, "succeeded", "failed"), 30, "its end")
    assert job["state"] == "succeeded", job
    assert started(markers, cold) is not None
    up = [e for e in autoscale_events(server, agent) if "cold start" in str(e["message"])]
    assert up, autoscale_events(server, agent)
    # Its session over (reported by the Node.js worker), the instance is idle: back to zero.
    await wait_for(at_zero, 60, "zero again after the session")
    down = autoscale_events(server, agent)[-1]
    assert "scale to zero" in str(down["message"]), down
    assert float(str(down["at"])) > float(job["ended_at"]), (down, job)
