"""TLS on `vf server` with a CA and a server certificate the test makes: a real livekit-agents
worker connects with wss://, LiveKit's own client dispatches over https, the local runtime's
instances get a wss:// URL and serve, and plain HTTP to the TLS port fails saying so."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp
import httpx
import psutil
import pytest
from cryptography.hazmat.primitives import serialization
from livekit import api

from tests.kube import CA
from tests.support import DEV_KEY, DEV_SECRET, Server, Worker, started, wait_for
from tests.test_deploy import AGENT_SRC, api_get, dispatch, vf
from voicefleet.control.tls import check_tls, instance_host
from voicefleet.errors import CannotStart


def make_certificates(
    folder: Path, ips: tuple[str, ...] = ("127.0.0.1",), dns: tuple[str, ...] = ("localhost",)
) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key), PEM files in `folder`: a CA of the
    test rig's (tests/kube.py, which makes the cluster's the same way) and a server's
    certificate it signs for `ips` and `dns`."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = CA.make()
    key, cert = ca.issue(
        folder, "server", dns[0] if dns else ips[0], server_names=dns, server_ips=ips
    )
    ca_path = folder / "ca.pem"
    ca_path.write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    return ca_path, cert, key


@pytest.mark.timeout(600)
async def test_workers_connect_with_wss_clients_dispatch_over_https_and_plain_http_fails(
    start_server: Callable[..., Server],
    start_worker: Callable[..., Worker],
    markers: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ca, cert, key = make_certificates(tmp_path / "tls")
    # Everything started from here trusts the test's CA, as an operator's machines would: the
    # server (which passes it on to its instances), the workers, the CLI, httpx in this test.
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    server = start_server("--ssl-certfile", str(cert), "--ssl-keyfile", str(key))
    assert server.url.startswith("https://127.0.0.1:")
    port = server.url.rsplit(":", 1)[1]

    worker = start_worker(server, "tls-agent", LIVEKIT_URL=f"wss://127.0.0.1:{port}")
    await worker.registered()
    context = ssl.create_default_context(cafile=str(ca))
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context))
    lk = api.LiveKitAPI(server.url, DEV_KEY, DEV_SECRET, session=session)
    try:
        d = await lk.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(agent_name="tls-agent", room="secure-room")
        )
        job_id = d.state.jobs[0].id
        await wait_for(lambda: started(markers, job_id), 60, "the job over wss to start")
    finally:
        await lk.aclose()
        await session.close()

    # Plain HTTP to the TLS port: no answer, and the CLI says what to try.
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
    url = f"http://127.0.0.1:{port}"
    plain = subprocess.run(
        [sys.executable, "-m", "voicefleet", "agent", "--url", url, "status", "--id", "x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert plain.returncode == 5, plain.stderr
    assert "cannot reach the voicefleet server" in plain.stderr
    assert f"https://127.0.0.1:{port}" in plain.stderr  # the hint: it serves TLS

    # The local runtime's instances connect back with wss:// and serve.
    agent_dir = tmp_path / "my-agent"
    shutil.copytree(AGENT_SRC, agent_dir)
    instance_markers = tmp_path / "instance-markers"
    instance_markers.mkdir()
    vf(server, agent_dir, "create")
    vf(server, agent_dir, "secrets", "set", f"MARKER_DIR={instance_markers}")
    vf(server, agent_dir, "deploy")
    instances = [
        i for i in api_get(server, "/agents/my-agent")["instances"] if i["status"] == "ready"
    ]
    env = psutil.Process(instances[0]["pid"]).environ()
    assert env["LIVEKIT_URL"] == f"wss://127.0.0.1:{port}"
    assert env["VOICEFLEET_URL"] == f"https://127.0.0.1:{port}"
    assert env["SSL_CERT_FILE"] == str(ca)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context))
    lk = api.LiveKitAPI(server.url, DEV_KEY, DEV_SECRET, session=session)
    try:
        call = await dispatch(lk, "secure-call")
        seen = await wait_for(lambda: started(instance_markers, call), 90, "a call on v1")
        assert seen["version"] == "v1"
    finally:
        await lk.aclose()
        await session.close()


def test_a_certificate_and_key_that_do_not_match_stop_the_start_with_one_line(
    tmp_path: Path,
) -> None:
    _, cert, _ = make_certificates(tmp_path / "one")
    _, _, other_key = make_certificates(tmp_path / "two")
    with pytest.raises(CannotStart, match="cannot be used together"):
        check_tls(cert, other_key)
    with pytest.raises(CannotStart, match="--ssl-certfile needs --ssl-keyfile"):
        check_tls(cert, None)
    done = subprocess.run(
        [
            sys.executable, "-m", "voicefleet", "server", "--dev", "--port", "0",
            "--data-dir", str(tmp_path / "data"),
            "--ssl-certfile", str(cert), "--ssl-keyfile", str(other_key),
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "the certificate and key cannot be used together" in done.stderr
    assert "Traceback" not in done.stderr


def test_local_instances_are_given_an_address_the_certificate_names(tmp_path: Path) -> None:
    _, loopback, _ = make_certificates(tmp_path / "a")
    assert instance_host("0.0.0.0", None) == "127.0.0.1"
    assert instance_host("::", None) == "[::1]"
    assert instance_host("10.1.2.3", None) == "10.1.2.3"
    assert instance_host("0.0.0.0", loopback) == "127.0.0.1"
    _, named, _ = make_certificates(tmp_path / "b", ips=(), dns=("vf.example.com",))
    assert instance_host("0.0.0.0", named) == "vf.example.com"
    _, local, _ = make_certificates(tmp_path / "c", ips=(), dns=("localhost",))
    assert instance_host("127.0.0.1", local) == "localhost"
    _, both, _ = make_certificates(tmp_path / "d", ips=("10.1.2.3",), dns=("vf.example.com",))
    assert instance_host("10.1.2.3", both) == "10.1.2.3"
