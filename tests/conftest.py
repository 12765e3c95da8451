from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings
from livekit import api

from tests.livekit import (
    VOICE_AGENT,
    BinaryUnavailable,
    LiveKitServer,
    NsVoicefleet,
    livekit_server,
    server_binary,
    vf_agent,
)
from tests.support import DEV_KEY, DEV_SECRET, Server, Worker

# Fuzz tests (tests/fuzz) in CI: a fixed number of examples from a fixed seed, so that a run is
# bounded and a failure is the same on every machine; HYPOTHESIS_PROFILE=deep explores further.
settings.register_profile(
    "ci", max_examples=60, derandomize=True, deadline=None, database=None, print_blob=True
)
settings.register_profile("deep", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session", autouse=True)
def shared_env_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The tests' servers share built environments (`vf server --env-cache`, as servers on one
    machine may): an agent's requirements are installed once per run, not once per test."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VF_ENV_CACHE", str(tmp_path_factory.mktemp("envs")))
        yield


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the tests that only need the defaults; each test uses its own agent names."""
    srv = Server(tmp_path_factory.mktemp("server"), "--availability-timeout", "3").start()
    yield srv
    srv.stop()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start a server of the test's own with extra `vf server` flags."""
    servers: list[Server] = []

    def start(*args: str, data_dir: Path | None = None, dev: bool = True, port: int = 0) -> Server:
        srv = Server(data_dir or tmp_path / f"server{len(servers)}", *args, dev=dev, port=port)
        servers.append(srv)  # first: one that fails to get ready is stopped all the same
        srv.start()
        return srv

    yield start
    for srv in servers:
        srv.stop()


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """Start real livekit-agents workers (tests/agents/marker_agent.py); all are killed after."""
    workers: list[Worker] = []

    def start(server: Server, agent_name: str, **env: str) -> Worker:
        worker = Worker(server, tmp_path / "markers", agent_name, **env)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


@pytest.fixture
def markers(tmp_path: Path) -> Path:
    return tmp_path / "markers"


@pytest.fixture
async def lkapi(server: Server) -> AsyncIterator[api.LiveKitAPI]:
    client = api.LiveKitAPI(server.url, DEV_KEY, DEV_SECRET)
    yield client
    await client.aclose()


# -- real calls: one livekit-server, one `vf server` in its namespace, the example agent built --
# (tests/test_calls.py, test_call_invariants.py, test_redispatch_calls.py; test_gateway.py has
# its own.)


@pytest.fixture(scope="session")
def lk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveKitServer]:
    try:
        binary = server_binary()
    except BinaryUnavailable as e:
        pytest.skip(f"livekit-server is not built and cannot be built here: {e}")
    with livekit_server(tmp_path_factory.mktemp("livekit"), binary=binary) as server:
        print(f"livekit-server in {server.ns.name}: log {server.log_path}")
        yield server


@pytest.fixture(scope="session")
def vf(lk: LiveKitServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NsVoicefleet]:
    server = NsVoicefleet(lk, tmp_path_factory.mktemp("voicefleet"))
    print(f"vf server log: {server.log_path}")
    try:
        yield server.started()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def built_agent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the example agent whose environment is already in the shared env cache
    (VF_ENV_CACHE, tests/conftest.py): built by a throwaway server outside the namespace, where
    PyPI is reachable, so that the server inside it, which cannot reach PyPI, reuses it."""
    folder = tmp_path_factory.mktemp("deployed") / "voice-agent"
    shutil.copytree(VOICE_AGENT.parent, folder)
    outside = Server(tmp_path_factory.mktemp("prebuild")).start()
    try:
        vf_agent(folder, outside.url, "create", "--name", "call-deploy")
        vf_agent(folder, outside.url, "deploy")
    finally:
        outside.stop()
    (folder / "livekit.toml").unlink()  # its id belongs to the throwaway server
    return folder
