"""Real parts for the tests: a `vf server` subprocess, real livekit-agents workers, waiting helpers.

Everything listens on 127.0.0.1 with a free port and is stopped by the fixture that started it,
or, if the test run itself is killed, by the signal `with_us` arranges.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx
import psutil

from voicefleet.protocol import tokens

ROOT = Path(__file__).resolve().parent.parent
MARKER_AGENT = ROOT / "tests" / "agents" / "marker_agent.py"
DEV_KEY, DEV_SECRET = "devkey", "secret"

T = TypeVar("T")


def with_us(argv: list[str]) -> list[str]:
    """`argv`, run so that it gets SIGTERM if the test process dies without stopping it (a run
    killed from outside: the servers and workers are in sessions of their own, out of reach of
    a signal to the run's process group). util-linux's setpriv sets the parent-death signal,
    then execs. That signal follows the *thread* that started the process, so a process started
    from another thread (asyncio.to_thread) is left as it was."""
    if threading.current_thread() is not threading.main_thread():
        return argv
    return ["setpriv", "--pdeathsig", "TERM", "--", *argv]


class Seen:
    """A check's "not yet" that says what it saw: falsy, so wait_for keeps polling, and shown in
    wait_for's timeout message, where a bare False would say nothing."""

    def __init__(self, what: object) -> None:
        self.what = what

    def __bool__(self) -> Literal[False]:
        return False

    def __repr__(self) -> str:
        return self.what if isinstance(self.what, str) else repr(self.what)


def until(
    check: Callable[[], T | None], what: str, timeout: float = 60.0, interval: float = 0.2
) -> T:
    """`wait_for` for tests without an event loop: poll `check` (blocking) until it returns
    something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def wait_for(
    check: Callable[[], T | Seen | Awaitable[T | Seen | None] | None],
    timeout: float = 20.0,
    what: str = "condition",
    interval: float = 0.05,
) -> T:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout`, and
    with the last thing `check` returned (return a `Seen` to say what the state was)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        last = result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        await asyncio.sleep(interval)


def admin_token() -> str:
    return tokens.mint_admin(DEV_KEY, DEV_SECRET)


class Server:
    """`vf server --dev` in a subprocess."""

    def __init__(self, data_dir: Path, *args: str, dev: bool = True, port: int = 0) -> None:
        self.data_dir = data_dir
        self.args = ("--dev", *args) if dev else args
        self.port = port
        self.log_path = data_dir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout: float = 30.0) -> Server:
        ready = self.data_dir / "ready.json"
        ready.unlink(missing_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            with_us([
                sys.executable, "-m", "voicefleet", "server", "--host", "127.0.0.1",
                "--port", str(self.port), "--data-dir", str(self.data_dir),
                "--ready-file", str(ready), *self.args,
            ]),
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"vf server exited ({self.proc.returncode}):\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"vf server not ready after {timeout}s:\n{self.log()}")
            time.sleep(0.05)
        self.url = json.loads(ready.read_text())["url"]
        return self

    @property
    def ws_url(self) -> str:
        return "ws" + self.url.removeprefix("http")  # https:// -> wss://

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, leave_instances: bool = False) -> None:
        """SIGTERM the server; then end the agent instances it started (their own process
        groups outlive it by design), unless `leave_instances` (a restart test)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        children = [] if leave_instances else psutil.Process(self.proc.pid).children()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for child in children:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGKILL)

    def _get(self, path: str, **params: Any) -> Any:
        r = httpx.get(
            self.url + path,
            params=params,
            headers={"Authorization": f"Bearer {admin_token()}"},
            timeout=10,
        )
        r.raise_for_status()
        return r.json()

    def workers(self, agent_name: str | None = None) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self._get("/api/v1/workers")
        return [w for w in found if agent_name is None or w["agent_name"] == agent_name]

    def jobs(self, **params: Any) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self._get("/api/v1/jobs", **{"limit": 1000, **params})
        return found

    def job(self, job_id: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = self._get(f"/api/v1/jobs/{job_id}")
        except httpx.HTTPStatusError as e:
            if e.response.status_code == 404:
                return None
            raise
        return found

    def metric(self, name: str, **labels: str) -> float:
        """One sample's value from /metrics (0 when absent)."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            if key == (f"{name}{{{want}}}" if want else name):
                return float(value)
        return 0.0


class Worker:
    """A real livekit-agents worker (tests/agents/marker_agent.py) in its own process group."""

    def __init__(self, server: Server, marker_dir: Path, agent_name: str, **env: str) -> None:
        self.server = server
        self.marker_dir = marker_dir
        self.agent_name = agent_name
        marker_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = marker_dir / f"worker-{agent_name}-{time.monotonic_ns()}.log"
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            with_us([sys.executable, str(MARKER_AGENT), "start"]),
            env={
                **os.environ,
                "LIVEKIT_URL": server.ws_url,
                "LIVEKIT_API_KEY": DEV_KEY,
                "LIVEKIT_API_SECRET": DEV_SECRET,
                "MARKER_DIR": str(marker_dir),
                "AGENT_NAME": agent_name,
                **env,
            },
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.id = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def registered(self, timeout: float = 60.0) -> str:
        """Wait until the server lists this worker; return its worker id."""

        def find() -> str | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited ({self.proc.returncode}):\n{self.log()}")
            text = self.log()
            marker = '"message": "registered worker"'
            for line in text.splitlines():
                if marker in line:
                    return str(json.loads(line)["id"])
            return None

        self.id = await wait_for(find, timeout, f"worker {self.agent_name} to register")
        return self.id

    def sigterm(self) -> None:
        os.kill(self.proc.pid, signal.SIGTERM)

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def release(marker_dir: Path, job_id: str) -> None:
    """Let a marker agent's job dispatched with {"until_released": true} end."""
    (marker_dir / f"{job_id}.release").write_text("release")


def started(marker_dir: Path, job_id: str) -> dict[str, Any] | None:
    path = marker_dir / f"{job_id}.started"
    if not path.exists():
        return None
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except ValueError:
        return None  # still being written
    return data


async def job_in(
    server: Server, job_id: str, *states: str, timeout: float = 30.0
) -> dict[str, Any]:
    """Wait until job `job_id` is in one of `states`; a timeout says the state and error it had."""

    def check() -> dict[str, Any] | Seen:
        job = server.job(job_id)
        if job is None:
            return Seen("no such job")
        if job["state"] in states:
            return job
        return Seen(f"state {job['state']!r}, error {job['error']!r}")

    return await wait_for(check, timeout, f"job {job_id} to be {'/'.join(states)}", interval=0.2)


# The error voicefleet records when a worker reports a job failed and gives no reason: all that
# livekit-agents 1.8.9 says when a job's process exits non-zero.
NO_REASON = "the agent's job failed"


async def ran_to_its_end(server: Server, markers: Path, job_id: str) -> dict[str, Any]:
    """Wait until the marker agent's job `job_id` has ended after its entrypoint ran to its end.

    Ended as its worker reported it: succeeded, or now and then failed with no reason.
    livekit-agents judges a job by its process's exit code (ipc/job_proc_executor.py:
    `SUCCESS if self.exitcode == 0 else FAILED`), and on Linux reads it from CPython's
    forkserver, whose Popen.poll is not safe from two threads (CPython gh-130895). Yet two poll
    each job process: the "proc_join_thread" (ipc/supervised_proc.py) that joins it, and the
    executor thread on which proc_pool.py starts the next idle process, as Process.start() polls
    every child first. When both find the status there, one reads it and the other reads EOF and
    records 255, often last: a process that exited 0 is reported JS_FAILED, error "". The worker
    sends nothing else voicefleet could tell this from a crash by, so that is what it records.
    """
    job = await job_in(server, job_id, "succeeded", "failed")
    assert (markers / f"{job_id}.done").exists(), f"the entrypoint of {job_id} did not finish"
    if job["state"] == "failed":
        assert job["error"] == NO_REASON, job
    return job
