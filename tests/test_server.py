"""`vf server` itself: credentials, health, metrics, broken configuration."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.support import Server
from voicefleet.protocol import tokens


def test_without_dev_credentials_are_generated_saved_0600_and_printed_once(
    start_server: Callable[..., Server], tmp_path: Path
) -> None:
    data = tmp_path / "prod"
    first = start_server(data_dir=data, dev=False)
    saved = json.loads((data / "credentials.json").read_text())
    assert stat.S_IMODE((data / "credentials.json").stat().st_mode) == 0o600
    assert saved["api_key"] != "devkey" and len(saved["api_secret"]) >= 32
    assert saved["api_secret"] in first.log()

    token = tokens.mint_admin(saved["api_key"], saved["api_secret"])
    headers = {"Authorization": f"Bearer {token}"}
    assert httpx.get(first.url + "/api/v1/workers", headers=headers).status_code == 200
    dev = tokens.mint_admin("devkey", "secret")
    denied = httpx.get(first.url + "/api/v1/workers", headers={"Authorization": f"Bearer {dev}"})
    assert denied.status_code == 401 and "unknown API key 'devkey'" in denied.text
    first.stop()

    log_before = (data / "server.log").read_text()
    second = start_server(data_dir=data, dev=False)
    assert json.loads((data / "credentials.json").read_text()) == saved
    assert saved["api_secret"] not in second.log()[len(log_before) :]
    assert httpx.get(second.url + "/api/v1/workers", headers=headers).status_code == 200


def test_broken_credentials_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "credentials.json").write_text("{not json")
    result = subprocess.run(
        [sys.executable, "-m", "voicefleet", "server", "--port", "0", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "credentials.json is not a voicefleet credentials file" in result.stderr


def test_health_readiness_and_metrics_are_served(server: Server) -> None:
    assert httpx.get(server.url + "/healthz").text == "ok\n"
    assert httpx.get(server.url + "/readyz").status_code == 200
    text = httpx.get(server.url + "/metrics").text
    for name in (
        "voicefleet_workers",
        "voicefleet_jobs",
        "voicefleet_dispatch_latency_seconds_bucket",
        "voicefleet_offers_total",
        "voicefleet_queued_jobs",
    ):
        assert f"\n{name}" in text or text.startswith(name) or f"# TYPE {name}" in text, name


def test_api_needs_an_admin_token(server: Server) -> None:
    assert httpx.get(server.url + "/api/v1/jobs").status_code == 401
    worker_only = tokens.mint("devkey", "secret", video={"agent": True})
    r = httpx.get(server.url + "/api/v1/jobs", headers={"Authorization": f"Bearer {worker_only}"})
    assert r.status_code == 403 and "agent admin grant" in r.text
