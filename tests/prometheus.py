"""A real Prometheus (Debian's `prometheus` package) on 127.0.0.1 for the tests: started with a
config of the test's own, stopped with its process group. tests/test_analysis.py (the canary's
PromQL checks) and tests/test_metrics.py (voicefleet's /metrics, alert rules, dashboard) use it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import with_us


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        pytest.skip("prometheus not installed (Debian package `prometheus`); .ci/run installs it")
    return found


@contextlib.contextmanager
def running_prometheus(
    root: Path, config: dict[str, Any], up: int, port: int | None = None
) -> Iterator[str]:
    """Prometheus with `config` (as a dict; YAML reads JSON) in `root`, its url once `up`
    targets have been scraped up."""
    target = f"127.0.0.1:{port or free_port()}"
    (root / "prometheus.yml").write_text(json.dumps(config))
    log = open(root / "log", "wb")
    proc = subprocess.Popen(
        with_us([binary(), f"--config.file={root / 'prometheus.yml'}",
                 f"--storage.tsdb.path={root / 'data'}", f"--web.listen-address={target}"]),
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    log.close()
    url = f"http://{target}"
    try:
        deadline = time.monotonic() + 60
        while True:  # until the targets have been scraped: their `up` series exist
            if proc.poll() is not None:
                pytest.fail(f"prometheus exited ({proc.returncode}):\n{(root / 'log').read_text()}")
            try:
                r = httpx.get(f"{url}/api/v1/query", params={"query": "count(up == 1)"})
                if r.json()["data"]["result"][0]["value"][1] == str(up):
                    break
            except (httpx.HTTPError, ValueError, KeyError, IndexError):
                pass  # not listening yet, or no series yet
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus not scraping after 60s:\n{(root / 'log').read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
