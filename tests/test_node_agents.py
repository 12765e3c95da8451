"""Node.js agents deployed as versions: `vf agent create/deploy`, real @livekit/agents workers.

The agent is examples/node_agent (its package.json and package-lock.json, @livekit/agents 1.9.0)
with the test's own agent.js, which writes markers: `<job>.started` when a session begins,
`<job>.done` when it ends (after `hold` seconds from its metadata); with a file FAIL beside it,
its sessions throw (a broken version). @livekit/agents 1.9 sends no job status by itself
(tests/test_outcomes.py): voicefleet's runtime has its instances report it
(src/voicefleet/runtime/node_jobs.mjs). Which version ran a session, and whether it ran to its
end, is read from its markers as well.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from livekit import api

from tests.support import DEV_KEY, DEV_SECRET, ROOT, Server, started, wait_for
from tests.test_deploy import api_get, job_state, vf
from voicefleet.build.local import LocalBuilder
from voicefleet.build.node import entry
from voicefleet.errors import BuildFailed
from voicefleet.runtime.local import _health_port, node_preload

EXAMPLE = ROOT / "examples" / "node_agent"

AGENT_JS = """\
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ServerOptions, cli, defineAgent } from '@livekit/agents';

const SOURCE = 'one';
const FAIL = fileURLToPath(new URL('./FAIL', import.meta.url));

function mark(ctx, what, extra = {}) {
  const data = { job_id: ctx.job.id, version: process.env.VOICEFLEET_VERSION, source: SOURCE,
    pid: process.pid, ...extra };
  writeFileSync(join(process.env.MARKER_DIR, `${ctx.job.id}.${what}`), JSON.stringify(data));
}

export default defineAgent({
  entry: async (ctx) => {
    const hold = Number(JSON.parse(ctx.job.metadata || '{}').hold || 0);
    mark(ctx, 'started');
    if (existsSync(FAIL)) throw new Error(readFileSync(FAIL, 'utf8').trim());
    await new Promise((resolve) => setTimeout(resolve, hold * 1000));
    mark(ctx, 'done');
    ctx.shutdown('done');
  },
});

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const port = Number(process.env.HEALTH_PORT || 0);
  cli.runApp(new ServerOptions({ agent: fileURLToPath(import.meta.url),
    ...(port ? { port } : {}) }));
}
"""


def node_agent(folder: Path, source: str = "one") -> Path:
    """examples/node_agent with the tests' agent.js in `folder` (its name is the agent's)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node/npm not found")
    shutil.copytree(EXAMPLE, folder, ignore=shutil.ignore_patterns("node_modules"))
    (folder / "agent.js").write_text(AGENT_JS.replace("'one'", f"'{source}'"))
    return folder


@pytest.fixture
def node_agent_dir(tmp_path: Path) -> Path:
    return node_agent(tmp_path / "my-agent")


async def dispatch(lk: api.LiveKitAPI, agent: str, room: str, hold: float = 0) -> str:
    d = await lk.agent_dispatch.create_dispatch(
        api.CreateAgentDispatchRequest(
            agent_name=agent, room=room, metadata=json.dumps({"hold": hold})
        )
    )
    return d.state.jobs[0].id


def marker(markers: Path, job_id: str, what: str) -> Callable[[], dict[str, Any] | None]:
    def read() -> dict[str, Any] | None:
        if what == "started":
            return started(markers, job_id)
        path = markers / f"{job_id}.{what}"
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return data

    return read


def build_seconds(server: Server, version: str) -> float:
    [row] = [v for v in api_get(server, "/agents/my-agent/versions") if v["version"] == version]
    return float(row["built_at"] - row["created_at"])


@pytest.mark.timeout(900)
async def test_node_agent_deploy_cached_rebuild_live_session_and_rollback(
    start_server: Callable[..., Server], node_agent_dir: Path, tmp_path: Path
) -> None:
    server = start_server("--keep-warm", "300")
    markers = tmp_path / "markers"
    markers.mkdir()
    created = vf(server, node_agent_dir, "create")  # a Node folder: package.json, a lockfile
    assert "wrote livekit.toml, Dockerfile" in created.stdout, created.stdout
    dockerfile = (node_agent_dir / "Dockerfile").read_text()
    assert "npm ci" in dockerfile and '"node", "agent.js", "start"' in dockerfile, dockerfile
    vf(server, node_agent_dir, "secrets", "set", f"MARKER_DIR={markers}")

    t0 = time.monotonic()
    first = vf(server, node_agent_dir, "deploy")
    deploy_v1 = time.monotonic() - t0
    assert "v1" in first.stdout, first.stdout
    assert "npm ci" in first.stdout, first.stdout
    build_v1 = build_seconds(server, "v1")

    lk = api.LiveKitAPI(server.url, DEV_KEY, DEV_SECRET)
    bare: subprocess.Popen[bytes] | None = None
    try:
        [worker_v1] = server.workers("my-agent")
        quick = await dispatch(lk, "my-agent", "node-v1-quick")
        ran = await wait_for(marker(markers, quick, "done"), 60, "a session on v1")
        assert ran["version"] == "v1" and ran["source"] == "one", ran
        # The instance reports how its sessions go, which @livekit/agents does not by itself.
        job = await wait_for(job_state(server, quick, "succeeded", "failed"), 30, "its end")
        assert job["state"] == "succeeded" and job["started_at"] > 0, job

        # A long session on v1, in flight while v2 deploys.
        long = await dispatch(lk, "my-agent", "node-v1-long", hold=25)
        on_v1 = await wait_for(marker(markers, long, "started"), 60, "the long session")
        assert on_v1["version"] == "v1", on_v1

        # v2 changes the source only: the lockfile's node_modules is reused, no npm ci.
        agent_js = node_agent_dir / "agent.js"
        agent_js.write_text(agent_js.read_text().replace("'one'", "'two'"))
        t0 = time.monotonic()
        second = vf(server, node_agent_dir, "deploy")
        deploy_v2 = time.monotonic() - t0
        deployed_at = time.time()
        assert "v2" in second.stdout, second.stdout
        assert "reusing node_modules" in second.stdout, second.stdout
        assert "reused cached environment" in second.stdout, second.stdout
        assert "npm ci" not in second.stdout, second.stdout
        build_v2 = build_seconds(server, "v2")
        [v2] = [v for v in api_get(server, "/agents/my-agent/versions") if v["version"] == "v2"]
        # From built to serving: one Node.js instance started and registered.
        cold_v2 = deployed_at - v2["built_at"]

        # New sessions go to v2.
        after = [await dispatch(lk, "my-agent", f"node-v2-{i}") for i in range(3)]
        for job_id in after:
            ran = await wait_for(marker(markers, job_id, "done"), 60, f"{job_id} on v2")
            assert ran["version"] == "v2" and ran["source"] == "two", ran

        # The session in flight during the deploy was not cut: it ran to its end on v1.
        assert not (markers / f"{long}.done").exists()  # still running after the deploy
        done = await wait_for(marker(markers, long, "done"), 60, "the long session to end")
        assert done["version"] == "v1" and done["pid"] == on_v1["pid"], done
        assert any(w["id"] == worker_v1["id"] for w in server.workers("my-agent"))  # kept warm

        # Rollback: the stored v1 build, kept warm; nothing rebuilt.
        builds = [
            (v["version"], v["built_at"]) for v in api_get(server, "/agents/my-agent/versions")
        ]
        t0 = time.monotonic()
        rolled = vf(server, node_agent_dir, "rollback")
        rollback_s = time.monotonic() - t0
        assert "rollback to v1: complete" in rolled.stdout, rolled.stdout
        assert "npm" not in rolled.stdout
        after_rb = [
            (v["version"], v["built_at"]) for v in api_get(server, "/agents/my-agent/versions")
        ]
        assert after_rb == builds
        back = await dispatch(lk, "my-agent", "node-back-on-v1")
        ran = await wait_for(marker(markers, back, "done"), 60, "a session back on v1")
        assert ran["version"] == "v1" and ran["source"] == "one", ran

        # Cold start beside a bare `node agent.js start` on the same server: the same code and
        # node_modules, its own agent name and health port.
        bare_dir = tmp_path / "bare"
        shutil.copytree(node_agent_dir, bare_dir, ignore=shutil.ignore_patterns("node_modules"))
        # The versions' sources link to the one cached node_modules.
        links = list(server.data_dir.rglob("src/node_modules"))
        assert len(links) == 2 and all(p.is_symlink() for p in links), links
        assert len({p.resolve() for p in links}) == 1, links
        (bare_dir / "node_modules").symlink_to(links[0].resolve())
        port = free_port()
        with open(tmp_path / "bare.log", "wb") as out:
            t0 = time.monotonic()
            bare = subprocess.Popen(
                ["node", "agent.js", "start"],
                cwd=bare_dir,
                env={
                    **os.environ, "LIVEKIT_URL": server.ws_url, "LIVEKIT_API_KEY": DEV_KEY,
                    "LIVEKIT_API_SECRET": DEV_SECRET, "LIVEKIT_AGENT_NAME": "bare-node",
                    "HEALTH_PORT": str(port), "MARKER_DIR": str(markers),
                },
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        await wait_for(lambda: server.workers("bare-node"), 90, "the bare Node worker", 0.02)
        cold_bare = time.monotonic() - t0
    finally:
        await lk.aclose()
        if bare is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(bare.pid, signal.SIGKILL)
            bare.wait()

    # An instance's log is its output; its health port is voicefleet's choice, not 8081.
    text = "".join(p.read_text(errors="replace") for p in server.data_dir.rglob("my-agent-*.log"))
    assert "Server is listening on port" in text, text[-2000:]
    assert "listening on port 8081" not in text
    print(
        f"\nNode.js agent: deploy v1 {deploy_v1:.1f}s (build with npm ci {build_v1:.2f}s); "
        f"deploy v2 {deploy_v2:.1f}s (build, cached node_modules {build_v2:.2f}s); "
        f"built -> serving {cold_v2:.1f}s; rollback {rollback_s:.1f}s; "
        f"bare `node agent.js start` -> registered {cold_bare:.2f}s"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- the builder's and the runtime's choices, without a server ----------------------------------


async def test_node_build_errors_are_clear(tmp_path: Path) -> None:
    builder = LocalBuilder(tmp_path / "envs")
    lines: list[str] = []
    src = tmp_path / "src"
    src.mkdir()
    (src / "package.json").write_text('{"name": "x"}')
    with pytest.raises(BuildFailed, match="no lockfile"):
        await builder.build(src, lines.append)
    (src / "pnpm-lock.yaml").write_text("lockfileVersion: '9.0'\n")
    if shutil.which("pnpm") is None:
        with pytest.raises(BuildFailed, match="needs pnpm, which is not installed"):
            await builder.build(src, lines.append)
    (src / "pnpm-lock.yaml").unlink()
    (src / "package.json").write_text('{"name": "x", "dependencies": {"left-pad": "1.3.0"}}')
    (src / "package-lock.json").write_text(
        '{"name": "x", "lockfileVersion": 3, "packages": {"": {"name": "x"}}}'
    )
    if shutil.which("npm") is not None:  # out of sync with package.json: npm ci refuses
        with pytest.raises(BuildFailed, match=r"npm ci failed \(exit \d+\):\n"):
            await builder.build(src, lines.append)
    (src / "agent.py").write_text("")  # agent.py: a Python agent, whatever else is there
    artifact = await builder.build(src, lines.append)
    assert artifact.python.name.startswith("python")


def test_node_entry_and_health_port_on_the_command_line(tmp_path: Path) -> None:
    (tmp_path / "package.json").write_text('{"scripts": {"build": "tsc"}}')
    assert entry(tmp_path) == "dist/agent.js"
    (tmp_path / "package.json").write_text('{"main": "./lib/main.js"}')
    assert entry(tmp_path) == "lib/main.js"
    (tmp_path / "livekit.toml").write_text('[agent]\nid = "CA_x"\nentry = "src/a.mjs"\n')
    assert entry(tmp_path) == "src/a.mjs"
    node = ["/usr/bin/node", "--import", node_preload(43210), "agent.js", "start"]
    assert _health_port(node) == 43210
    assert _health_port(["py", "launch.py", "--port", "4321", "agent.py", "start"]) == 4321
