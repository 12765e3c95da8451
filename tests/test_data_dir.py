"""The data dir as users meet it: the default relative `.voicefleet`, a full disk, and a data
dir that cannot be used at all (corrupt database, a file, read-only).

Each test starts a real `vf server`; the full and read-only ones mount a real tmpfs (root only).
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from livekit import api

from tests.support import DEV_KEY, DEV_SECRET, Server, admin_token, started, wait_for
from tests.test_deploy import AGENT_SRC, api_get, dispatch, vf
from voicefleet.build.bundle import create_bundle
from voicefleet.build.local import LocalBuilder
from voicefleet.errors import BuildFailed


def vf_server(*args: str) -> list[str]:
    return [sys.executable, "-m", "voicefleet", "server", "--dev", "--port", "0", *args]


def start_in(cwd: Path, *args: str, env: dict[str, str] | None = None) -> Server:
    """`vf server --dev --port 0 --ready-file ready.json ARGS` run in `cwd`, as a user starts
    it from a shell: relative paths are the user's, resolved against `cwd`."""
    server = Server(cwd / ".voicefleet")
    server.log_path = cwd / "server.log"
    ready = cwd / "ready.json"
    with open(server.log_path, "ab") as log:
        server.proc = subprocess.Popen(
            vf_server("--ready-file", "ready.json", *args),
            cwd=cwd,
            env=env or server_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 30
    while not ready.exists():
        if server.proc.poll() is not None:
            raise RuntimeError(f"vf server exited ({server.proc.returncode}):\n{server.log()}")
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"vf server not ready after 30s:\n{server.log()}")
        time.sleep(0.05)
    server.url = json.loads(ready.read_text())["url"]
    return server


def server_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "VF_DATA_DIR"}
    return {**env, **extra}


@pytest.fixture
def mounts() -> Iterator[Callable[..., Path]]:
    """`mount(folder, "size=8m")`: a real tmpfs on `folder`, unmounted after the test."""
    mounted: list[Path] = []

    def mount(folder: Path, *options: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root (CI runs the tests as root)")
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", ",".join(("mode=0755", *options)), "tmpfs", folder],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        # Lazy: the agent instances a test's server started are killed, not yet reaped.
        subprocess.run(["umount", "--lazy", folder], check=True)


@pytest.fixture
def servers(mounts: Callable[..., Path]) -> Iterator[list[Server]]:
    """Servers to stop after the test: before its mounts are unmounted (hence `mounts`)."""
    started: list[Server] = []
    yield started
    for server in started:
        server.stop()


# -- A: the README's path, with the default relative data dir ----------------------------------


async def test_the_readme_deploy_path_with_the_default_relative_data_dir_builds_and_serves(
    tmp_path: Path, servers: list[Server]
) -> None:
    here = tmp_path / "home"
    here.mkdir()
    # The shared env cache keeps the build cheap; given relatively, as a user may type it.
    cache = os.path.relpath(os.environ["VF_ENV_CACHE"], here)
    server = start_in(here, env=server_env(VF_ENV_CACHE=cache))  # no --data-dir: .voicefleet
    servers.append(server)
    agent_dir = here / "my-agent"
    shutil.copytree(AGENT_SRC, agent_dir)
    markers = tmp_path / "markers"
    markers.mkdir()

    vf(server, agent_dir, "create")
    agent_id = api_get(server, "/agents/my-agent")["agent"]["id"]
    admin = {"Authorization": f"Bearer {admin_token()}"}
    for path, body in [
        ("secrets", {"secrets": {"MARKER_DIR": str(markers)}}),
        ("flags/greeting", {"type": "string", "value": "hello"}),
    ]:
        r = httpx.put(f"{server.url}/api/v1/agents/{agent_id}/{path}", json=body, headers=admin)
        assert r.is_success, r.text
    deployed = vf(server, agent_dir, "deploy")
    assert "v1" in deployed.stdout

    [version] = api_get(server, "/agents/my-agent/versions")
    assert (version["status"], version["deployment"]) == ("ready", "production"), version
    [instance] = api_get(server, "/agents/my-agent")["instances"]
    assert instance["status"] == "ready", instance
    assert [w["instance"] for w in server.workers("my-agent")] == [instance["id"]]  # registered
    lk = api.LiveKitAPI(server.url, DEV_KEY, DEV_SECRET)
    try:
        job_id = await dispatch(lk, "call-1")
        marker = await wait_for(lambda: started(markers, job_id), 60, "the session to start")
    finally:
        await lk.aclose()
    assert marker["version"] == "v1"
    # The instance, started in its sources, found voicefleet.sdk in the data dir: the flag.
    assert marker["greeting"] == "hello"
    # The data dir is where the user started the server, and no environment was built into
    # the version's sources.
    source = here / ".voicefleet" / "agents" / agent_id / "v1" / "src"
    assert (source / "agent.py").exists()
    assert list(source.rglob("pyvenv.cfg")) == []


# -- B: a full disk ------------------------------------------------------------------------------


def fill(folder: Path) -> None:
    """Take every free block of the file system `folder` is on."""
    with open(folder / "filler", "wb", buffering=0) as f:
        for chunk in (b"\0" * (1 << 20), b"\0" * 4096, b"\0"):
            try:
                while True:
                    f.write(chunk)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise


def test_a_full_data_dir_answers_503_naming_it_and_logs_one_line_without_traceback(
    tmp_path: Path, mounts: Callable[..., Path], servers: list[Server]
) -> None:
    data = mounts(tmp_path / "data", "size=16m")
    server = Server(data)
    server.log_path = tmp_path / "server.log"  # off the full disk, so that its lines land
    servers.append(server.start())
    agent_dir = tmp_path / "my-agent"
    shutil.copytree(AGENT_SRC, agent_dir)
    vf(server, agent_dir, "create")
    fill(data)

    bundle = tmp_path / "bundle.tar.gz"
    create_bundle(agent_dir, bundle)
    r = httpx.post(
        f"{server.url}/api/v1/agents/my-agent/versions",
        content=bundle.read_bytes(),
        headers={"Authorization": f"Bearer {admin_token()}", "Content-Type": "application/gzip"},
    )
    said = f"the data dir {data.resolve()} is full (No space left on device): free space and retry"
    assert r.status_code == 503, r.text
    assert r.json() == {"detail": said, "code": "unavailable"}
    deploy = vf(server, agent_dir, "deploy", ok=False)
    assert deploy.returncode == 1 and said in deploy.stderr, deploy.stderr

    # The store's own write (SQLite says "database or disk is full"): the same answer.
    def create_another() -> httpx.Response:
        return httpx.post(
            f"{server.url}/api/v1/agents",
            json={"name": "another"},
            headers={"Authorization": f"Bearer {admin_token()}"},
        )

    r = create_another()
    full = f"the data dir {data.resolve()} is full ("
    assert r.status_code == 503 and r.json()["detail"].startswith(full), r.text

    assert httpx.get(f"{server.url}/healthz").status_code == 200
    log = server.log()
    assert "Traceback" not in log
    assert len([line for line in log.splitlines() if full in line]) == 3, log  # one a request
    assert api_get(server, "/agents/my-agent/versions") == []

    # Space freed, the same request goes through.
    (data / "filler").unlink()
    assert create_another().status_code == 201


async def test_a_build_on_a_full_disk_fails_saying_so_and_leaves_no_half_environment(
    tmp_path: Path, mounts: Callable[..., Path]
) -> None:
    envs = mounts(tmp_path / "envs", "size=1m")
    source = tmp_path / "src"
    source.mkdir()
    (source / "agent.py").write_text("")
    fill(envs)
    with pytest.raises(BuildFailed, match="No space left on device"):
        await LocalBuilder(envs).build(source, lambda _: None)
    left = [p.suffix for p in envs.iterdir() if p.name != "filler"]
    assert left == [".lock"]  # the digest's lock alone: no half-built environment


# -- C: a data dir that cannot be used -----------------------------------------------------------


def start_failing(tmp_path: Path, *args: str) -> tuple[int, str]:
    """Start `vf server --dev ARGS` that is expected to fail: its exit code and output."""
    ready = tmp_path / "ready.json"
    with open(tmp_path / "out.log", "wb") as out:
        proc = subprocess.Popen(
            vf_server("--ready-file", str(ready), *args),
            env=server_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while proc.poll() is None:
            assert not ready.exists(), "the server started"
            assert time.monotonic() < deadline, "the server neither started nor stopped in 30 s"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, (tmp_path / "out.log").read_text()


@pytest.mark.parametrize("case", ["corrupt database", "a file", "read-only"])
def test_a_data_dir_that_cannot_be_used_stops_the_start_with_one_line_saying_where(
    tmp_path: Path, mounts: Callable[..., Path], case: str
) -> None:
    data = tmp_path / "data"
    if case == "corrupt database":
        data.mkdir()
        (data / "voicefleet.db").write_bytes(random.Random(0).randbytes(1 << 16))
        where = data / "voicefleet.db"
    elif case == "a file":
        data.write_text("not a folder")
        where = data
    else:
        where = mounts(data, "ro", "size=1m")

    code, output = start_failing(tmp_path, "--data-dir", str(data))

    lines = output.strip().splitlines()
    assert code == 2, output
    assert "Traceback" not in output
    assert len(lines) == 2 and lines[0].startswith("error: "), output  # the error, a hint
    assert f"({where.resolve()})" in lines[0], output


def test_an_upload_cut_short_by_a_stopped_server_does_not_block_the_next_one(
    tmp_path: Path, start_server: Callable[..., Server]
) -> None:
    server = start_server(data_dir=tmp_path / "data")
    admin = {"Authorization": f"Bearer {admin_token()}"}
    agent = httpx.post(server.url + "/api/v1/agents", json={"name": "cut"}, headers=admin).json()
    # What a server that stopped between unpacking v1 and recording it leaves behind.
    leftover = tmp_path / "data" / "agents" / agent["id"] / "v1" / "src"
    leftover.mkdir(parents=True)
    (leftover / "agent.py").write_text("half of an old upload")
    bundle = tmp_path / "bundle.tar.gz"
    create_bundle(AGENT_SRC, bundle)
    r = httpx.post(
        server.url + "/api/v1/agents/cut/versions",
        content=bundle.read_bytes(),
        headers={**admin, "Content-Type": "application/gzip"},
        timeout=60,
    )
    assert r.status_code == 201 and r.json()["version"] == "v1", r.text
    assert (leftover / "agent.py").read_text() == (AGENT_SRC / "agent.py").read_text()
