"""The test rig's own promise: what a test starts does not outlive a run killed from outside."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

from tests.support import ROOT

CHILD = """
import subprocess, sys, time
from tests.support import with_us
p = subprocess.Popen(with_us(["sleep", "300"]), start_new_session=True)
print(p.pid, flush=True)
time.sleep(300)
"""


def test_a_server_started_with_us_ends_when_the_test_process_is_killed() -> None:
    run = subprocess.Popen(
        [sys.executable, "-c", CHILD], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert run.stdout is not None
    pid = int(run.stdout.readline())
    server = psutil.Process(pid)
    try:
        assert server.is_running() and server.status() != psutil.STATUS_ZOMBIE
        os.kill(run.pid, signal.SIGKILL)  # as a CI timeout would: no cleanup runs
        run.wait()
        deadline = time.monotonic() + 30
        while server.is_running() and server.status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the server outlived the killed test process"
            time.sleep(0.05)
    finally:
        if server.is_running():
            server.kill()
