"""The Node.js flags SDK (sdk/node, npm package @voicefleet/flags): its own build and tests
(`npm ci && npm run build && npm test`, which include the shared vectors), and a Node process
using the packed package against a real `vf server`: it streams an agent's flags with an
instance's own key, sees a flip, keeps its copy when the server stops, and a process started
while the server is down reads the cache file, else the environment."""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from livekit import api

from tests.support import DEV_KEY, DEV_SECRET, ROOT, Server, admin_token, started, wait_for
from tests.test_deploy import vf
from tests.test_flags import create_agent, put_flag, vf_flags
from tests.test_node_agents import EXAMPLE, dispatch
from voicefleet.protocol.tokens import WorkerIdentity, instance_credentials
from voicefleet.sdk import FlagsClient, Session
from voicefleet.sdk.evaluate import evaluate

# npm ci and the TypeScript build come first (the module's fixture), minutes on a busy machine.
pytestmark = pytest.mark.timeout(600)
PROBE = ROOT / "tests" / "node" / "flags_probe.mjs"
SESSIONS = 40


def npm(folder: Path, *args: str, timeout: float = 300) -> str:
    result = subprocess.run(
        ["npm", "--no-audit", "--no-fund", "--loglevel=error", *args],
        cwd=folder, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert result.returncode == 0, f"npm {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def sdk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sdk/ copied (the package and the vectors its tests read), then `npm ci` and built, as CI
    does from a fresh clone: nothing is written into the work tree."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node/npm not found")
    copy = tmp_path_factory.mktemp("sdk") / "sdk"
    shutil.copytree(
        ROOT / "sdk", copy, ignore=shutil.ignore_patterns("node_modules", "dist", "*.tgz")
    )
    package = copy / "node"
    npm(package, "ci")
    npm(package, "run", "build")
    return package


def test_the_node_sdk_builds_and_its_own_tests_pass(sdk: Path) -> None:
    out = npm(sdk, "test")
    assert "# fail 0" in out and "# pass " in out, out
    # The package ships its types and both entry points.
    manifest = json.loads((sdk / "package.json").read_text())
    assert manifest["types"] == "./dist/index.d.ts"
    for entry in ("index", "openfeature"):
        assert (sdk / "dist" / f"{entry}.d.ts").exists(), entry


class Probe:
    """tests/node/flags_probe.mjs in a child process; its lines (one per change) in a queue."""

    def __init__(self, app: Path, env: dict[str, str], *args: str) -> None:
        self.proc = subprocess.Popen(
            ["node", str(app / "probe.mjs"), *args],
            cwd=app, env={**os.environ, **env, "SESSIONS": str(SESSIONS)},
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def until(
        self, check: Callable[[dict[str, Any]], bool], what: str, timeout: float = 20
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = self.lines.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    stderr = self.proc.stderr.read() if self.proc.stderr else ""
                    raise AssertionError(
                        f"the probe exited ({self.proc.returncode}): {stderr}"
                    ) from None
                continue
            if check(last):
                return last
        raise AssertionError(f"timed out waiting for {what} (last line: {last})")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def app(sdk: Path, tmp_path: Path) -> Path:
    """An app that installs the SDK as users do: the packed tarball, and OpenFeature's SDK."""
    packed = npm(sdk, "pack", "--pack-destination", str(tmp_path))  # prepack builds first
    tarball = tmp_path / packed.strip().splitlines()[-1]
    folder = tmp_path / "app"
    folder.mkdir()
    (folder / "package.json").write_text('{"name": "probe", "private": true, "type": "module"}')
    npm(folder, "install", "--prefer-offline", str(tarball), "@openfeature/server-sdk@1.23.0")
    shutil.copy(PROBE, folder / "probe.mjs")
    return folder


@pytest.fixture
def probes() -> Iterator[Callable[..., Probe]]:
    started: list[Probe] = []

    def start(app: Path, env: dict[str, str], *args: str) -> Probe:
        started.append(Probe(app, env, *args))
        return started[-1]

    yield start
    for probe in started:
        probe.stop()


def test_a_node_process_streams_flags_from_vf_server_and_keeps_them_when_it_stops(
    start_server: Callable[..., Server],
    app: Path,
    probes: Callable[..., Probe],
    tmp_path: Path,
) -> None:
    server = start_server()
    agent_id = create_agent(server, "node-flags")
    put_flag(server, agent_id, "greeting", {"type": "string", "value": "hello"})
    pct = {"type": "boolean", "value": False, "rules": [{"when": [], "percent": 30, "value": True}]}
    put_flag(server, agent_id, "pct", pct)
    # As voicefleet's runtime starts an instance: its own key, for its agent's flags only.
    key, secret = instance_credentials(
        DEV_SECRET, WorkerIdentity(agent=agent_id, version="v1", instance="i-node")
    )
    cache = tmp_path / "flags-cache.json"
    env = {
        "VOICEFLEET_URL": server.url,
        "VOICEFLEET_AGENT_ID": agent_id,
        "LIVEKIT_API_KEY": key,
        "LIVEKIT_API_SECRET": secret,
        "VOICEFLEET_FLAGS_CACHE": str(cache),
    }
    probe = probes(app, env)
    live = probe.until(lambda s: s["source"] == "live", "the first live snapshot")
    assert live["greeting"] == "hello"
    assert live["of"] == {"value": "hello", "reason": "DEFAULT"}
    # The same sessions get the same answers as from the Python SDK, for the server's flag.
    definition = httpx.get(
        f"{server.url}/api/v1/agents/{agent_id}/flags/pct",
        headers={"Authorization": f"Bearer {admin_token()}"},
    ).json()
    python = [evaluate(definition, Session(dispatch_id=f"AD_{i}"))[0] for i in range(SESSIONS)]
    assert live["pct"] == python
    assert 0 < sum(python) < SESSIONS  # both sides of the 30 % are in the comparison

    began = time.monotonic()
    put_flag(server, agent_id, "greeting", {"type": "string", "value": "bonjour"})
    flipped = probe.until(lambda s: s["greeting"] == "bonjour", "the flip")
    print(f"flag change reached the Node process in {(time.monotonic() - began) * 1e3:.0f} ms")
    assert flipped["source"] == "live"
    r = httpx.post(
        f"{server.url}/api/v1/agents/{agent_id}/flags/pct/kill",
        headers={"Authorization": f"Bearer {admin_token()}"},
    )
    r.raise_for_status()
    killed = probe.until(lambda s: s["pct"] == [False] * SESSIONS, "the kill switch")
    assert killed["greeting"] == "bonjour"

    server.stop()
    down = probe.until(lambda s: s["source"] == "cached", "the client to notice the server left")
    assert down["greeting"] == "bonjour"
    assert down["of"] == {"value": "bonjour", "reason": "CACHED"}

    # A process started while the server is down reads the cache file the first one wrote...
    late = probes(app, env, "--once").until(lambda s: True, "the late process's line")
    assert (late["source"], late["greeting"]) == ("cached", "bonjour")
    # ... which the Python SDK reads too (one format for both).
    python_client = FlagsClient(server.url, agent_id, key, secret, cache_path=cache)
    assert python_client.get_str("greeting") == "bonjour"
    # With no cache either, the VOICEFLEET_FLAG_<KEY> variable, then the caller's default.
    bare_env = {**env, "VOICEFLEET_FLAGS_CACHE": str(tmp_path / "none.json")}
    bare = probes(app, {**bare_env, "VOICEFLEET_FLAG_GREETING": "salut"}, "--once")
    line = bare.until(lambda s: True, "the bare process's line")
    assert (line["source"], line["greeting"]) == ("env", "salut")
    assert line["of"] == {"value": "salut", "reason": "STATIC"}
    nothing = probes(app, bare_env, "--once").until(lambda s: True, "a line")
    assert nothing["greeting"] == "default"


AGENT_JS = """\
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ServerOptions, cli, defineAgent } from '@livekit/agents';
import { Session, flags } from '@voicefleet/flags';

// At import: the idle job processes @livekit/agents keeps ready stream before their job comes.
const client = flags();

export default defineAgent({
  entry: async (ctx) => {
    const live = await client.waitReady(5000); // at once when the stream is up
    const greeting = client.getString('greeting', 'none', Session.fromJob(ctx.job));
    const data = { job_id: ctx.job.id, greeting, live, source: client.source,
      instance: process.env.VOICEFLEET_INSTANCE_ID, pid: process.pid };
    writeFileSync(join(process.env.MARKER_DIR, `${ctx.job.id}.started`), JSON.stringify(data));
    ctx.shutdown('done');
  },
});

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const port = Number(process.env.HEALTH_PORT || 0);
  cli.runApp(new ServerOptions({ agent: fileURLToPath(import.meta.url),
    ...(port ? { port } : {}) }));
}
"""


@pytest.mark.timeout(900)
async def test_a_deployed_node_agent_sees_a_flipped_flag_in_its_next_session(
    sdk: Path, start_server: Callable[..., Server], tmp_path: Path
) -> None:
    """examples/node_agent with the SDK vendored as the docs say (the packed tarball in the
    agent's folder, in its lockfile), deployed by `vf agent deploy`: voicefleet's runtime gives
    the instance what the client needs, and a flip reaches the next session, no restart (how
    fast: benchmarks/flags/flip.py)."""
    folder = tmp_path / "my-agent"
    shutil.copytree(EXAMPLE, folder, ignore=shutil.ignore_patterns("node_modules"))
    (folder / "agent.js").write_text(AGENT_JS)
    tarball = npm(sdk, "pack", "--pack-destination", str(folder)).strip().splitlines()[-1]
    npm(folder, "install", "--package-lock-only", "--prefer-offline", f"./{tarball}")
    markers = tmp_path / "markers"
    markers.mkdir()

    server = start_server()
    vf(server, folder, "create")
    vf(server, folder, "secrets", "set", f"MARKER_DIR={markers}")
    vf(server, folder, "deploy")
    vf_flags(server, "set", "my-agent", "greeting", "hello")
    agent_id = server._get("/api/v1/agents/my-agent")["agent"]["id"]
    # Where the runtime tells the instance's clients to keep their copy (the data dir); each
    # snapshot a client receives is written there, so it says when they have a change.
    cache = server.data_dir / "agents" / agent_id / "flags-cache.json"

    async def copied(greeting: str) -> None:
        def check() -> bool:
            client = FlagsClient("", agent_id, cache_path=cache)  # the Python SDK reads it
            return client.get_str("greeting", "x") == greeting

        await wait_for(check, 20, f"the instance's copy to say {greeting!r}")

    lk = api.LiveKitAPI(server.url, DEV_KEY, DEV_SECRET)
    try:
        first = await dispatch(lk, "my-agent", "node-flag-1")
        seen = await wait_for(lambda: started(markers, first), 60, "the first session")
        assert (seen["greeting"], seen["live"]) == ("hello", True), seen

        vf_flags(server, "set", "my-agent", "greeting", "bonjour")
        await copied("bonjour")  # the instance's clients have it
        second = await dispatch(lk, "my-agent", "node-flag-2")
        seen2 = await wait_for(lambda: started(markers, second), 60, "the second session")
        assert seen2["greeting"] == "bonjour", seen2
        assert seen2["instance"] == seen["instance"]  # the same instance: no restart

        vf_flags(server, "kill", "my-agent", "greeting")
        await copied("")
        third = await dispatch(lk, "my-agent", "node-flag-3")
        seen3 = await wait_for(lambda: started(markers, third), 60, "the third session")
        assert seen3["greeting"] == "", seen3  # a killed string flag gives its off value
    finally:
        await lk.aclose()
