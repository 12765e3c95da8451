"""How sessions end, as voicefleet records them: a session whose entrypoint raised, or whose job
process was killed or exited non-zero, is failed with its reason; a clean one succeeded.

Deployed instances run under voicefleet's launcher (src/voicefleet/runtime/launch.py), which has
the worker report the truth; workers voicefleet did not start report what their SDK reports, and
these tests pin what that is: livekit-agents 1.8.9 (Python) and @livekit/agents 1.9 (Node.js).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from multiprocessing import connection, forkserver, popen_forkserver
from pathlib import Path
from typing import Any

import psutil
import pytest
from livekit import api
from livekit.agents import ipc, worker
from livekit.agents.ipc import job_proc_executor, job_proc_lazy_main, log_queue, supervised_proc
from livekit.protocol.agent_dispatch import JobRestartPolicy
from prometheus_client import CollectorRegistry, Counter
from sqlalchemy.ext.asyncio import create_async_engine

from tests.support import DEV_KEY, DEV_SECRET, ROOT, Server, started, wait_for
from tests.test_deploy import api_get, job_state, vf
from voicefleet.dispatch.jobs import Job, JobBook, JobState
from voicefleet.runtime import launch
from voicefleet.store.records import FAILURE_KINDS, Recorder, failure_kind

AGENT_SRC = ROOT / "tests" / "agents" / "outcomes"
NODE_DIR = ROOT / "tests" / "node"
ENDED = ("succeeded", "failed", "terminated")
NO_REASON = "the agent's job failed"  # what voicefleet records for JS_FAILED with error=""


def _traceback(raiser: Callable[[], None]) -> str:
    try:
        raiser()
    except BaseException as e:
        return "".join(traceback.format_exception(e))
    raise AssertionError("did not raise")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _dispatch(
    lk: api.LiveKitAPI,
    agent_name: str,
    room: str,
    restart_policy: int = JobRestartPolicy.JRP_ON_FAILURE,
    **how: Any,
) -> str:
    d = await lk.agent_dispatch.create_dispatch(
        api.CreateAgentDispatchRequest(
            agent_name=agent_name,
            room=room,
            metadata=json.dumps(how),
            restart_policy=restart_policy,  # type: ignore[arg-type]
        )
    )
    return d.state.jobs[0].id


async def _ended(server: Server, job_id: str, timeout: float = 90) -> dict[str, Any]:
    return await wait_for(job_state(server, job_id, *ENDED), timeout, f"job {job_id} to end")


# -- the launcher's hooks, pinned against livekit-agents 1.8.9 ---------------------------------


def test_the_launcher_hooks_exist_as_it_expects_in_the_pinned_livekit_agents() -> None:
    # The crash record: logged by the job process with the exception, forwarded to the worker
    # with the job's id added (ProcJobExecutor.logging_extra), handled on logger callHandlers.
    assert f'"{launch.CRASH_RECORD}"' in inspect.getsource(job_proc_lazy_main._JobProc)
    assert "exc_info=t.exception()" in inspect.getsource(job_proc_lazy_main._JobProc)
    assert 'extra["job_id"]' in inspect.getsource(job_proc_executor.ProcJobExecutor.logging_extra)
    assert job_proc_lazy_main.logger.name == "livekit.agents"  # where the launcher listens
    forwarded = inspect.getsource(log_queue.LogQueueHandler.emit)
    assert "record.msg = msg" in forwarded and "record.exc_text" in forwarded
    assert "callHandlers(record)" in inspect.getsource(log_queue.LogQueueListener.handle)
    # ... and handled before the worker hears that the process ended.
    run = inspect.getsource(supervised_proc.SupervisedProc._start)
    assert run.index("log_listener.stop()") < run.index("self._join_fut.set_result")
    # The job update the launcher replaces: still exit-code only, still without an error.
    update = inspect.getsource(worker.AgentServer._update_job_status)
    assert 'error=""' in update and "proc.status" in update
    assert inspect.iscoroutinefunction(worker.AgentServer._queue_msg)
    supervise = inspect.getsource(job_proc_executor.ProcJobExecutor._supervise_task)
    assert "JobStatus.SUCCESS if self.exitcode == 0 else JobStatus.FAILED" in supervise
    for name in ("running_job", "status", "exitcode", "killed"):
        assert isinstance(getattr(job_proc_executor.ProcJobExecutor, name), property), name
    assert {s.name for s in ipc.job_executor.JobStatus} == {"RUNNING", "SUCCESS", "FAILED"}


def test_an_exception_is_summed_up_as_its_type_and_the_first_line_of_its_message() -> None:
    def broken() -> None:
        raise RuntimeError("v2 is broken")

    def chained() -> None:
        try:
            {}["missing"]
        except KeyError as e:
            raise ValueError("bad config\nsecond line\n  indented third") from e

    class QuietError(Exception):
        pass

    def quiet() -> None:
        raise QuietError

    def group() -> None:
        raise ExceptionGroup("two went wrong", [TypeError("a"), OSError("b")])

    def long() -> None:
        raise RuntimeError("x" * 1000)

    assert launch.summary(_traceback(broken)) == "RuntimeError: v2 is broken"
    assert launch.summary(_traceback(chained)) == "ValueError: bad config"
    assert launch.summary(_traceback(quiet)).endswith("QuietError")
    assert launch.summary(_traceback(group)) == "ExceptionGroup: two went wrong (2 sub-exceptions)"
    cut = launch.summary(_traceback(long))
    assert cut.startswith("RuntimeError: xxx") and len(cut) == launch.MAX_ERROR


def test_a_job_process_that_died_is_named_by_its_signal_or_exit_code() -> None:
    assert launch.process_end(-signal.SIGKILL, False) == "job process killed by SIGKILL"
    assert (
        launch.process_end(-signal.SIGKILL, True) == "job process killed by SIGKILL (by its worker)"
    )
    assert launch.process_end(3, False) == "job process exited with code 3"
    assert launch.process_end(0, False) is None
    assert launch.process_end(None, False) is None


def test_two_threads_reading_a_job_process_exit_status_never_make_a_clean_exit_255(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # CPython gh-130895, hit by livekit-agents: it joins each job process on a thread while
    # Process.start() on another polls every finished child. The loser of that race read EOF
    # and recorded 255: a clean session reported failed. Here both threads are held at the read
    # until the other comes too, as a loaded machine does now and then; fixed, only one reads.
    monkeypatch.setattr(popen_forkserver.Popen, "poll", popen_forkserver.Popen.poll)  # undone after
    launch._read_exit_status_once()
    child = multiprocessing.get_context("forkserver").Process(target=int)  # exits 0 at once
    child.start()
    connection.wait([child.sentinel])  # it ended: its status waits in the pipe
    both = threading.Barrier(2)
    reads: list[object] = []
    real_read = forkserver.read_signed

    def read_signed(fd: int) -> int:
        with contextlib.suppress(threading.BrokenBarrierError):
            both.wait(timeout=5)  # broken when the other thread never comes to read
        try:
            code = real_read(fd)
        except EOFError:
            reads.append("EOF")
            raise
        reads.append(code)
        return code

    monkeypatch.setattr(forkserver, "read_signed", read_signed)
    joiner = threading.Thread(target=child.join)
    joiner.start()
    child.is_alive()
    joiner.join()
    assert reads == [0] and child.exitcode == 0, (reads, child.exitcode)


def test_failed_sessions_are_counted_once_each_by_a_fixed_kind_of_reason() -> None:
    registry = CollectorRegistry()
    counter = Counter("failed_sessions", "test", ["kind"], registry=registry)
    book = JobBook()
    recorder = Recorder(create_async_engine("sqlite+aiosqlite://"), failures=counter)
    book.job_listeners.append(recorder.job_changed)

    def end(error: str, *path: JobState) -> None:
        job = Job(
            id=f"AJ_{len(book.jobs)}", dispatch_id="AD_x", agent_name="a", room="r", room_sid=""
        )
        book.add_job(job)
        for state in path:
            book.transition(job, state, error)
        book.transition(job, JobState.FAILED, error)  # once more: already ended, not counted

    running = (JobState.ASSIGNED, JobState.RUNNING, JobState.FAILED)
    end(launch.summary(_traceback(lambda: int("x"))), *running)  # ValueError: invalid literal…
    end(str(launch.process_end(-signal.SIGKILL, False)), *running)
    end(str(launch.process_end(-signal.SIGSEGV, True)), *running)
    end(str(launch.process_end(3, False)), *running)
    end("worker AW_x disconnected while the job was running", *running)
    end("voicefleet restarted and no worker reported this job after reconnecting", *running)
    end("the agent's job failed", JobState.ASSIGNED, JobState.FAILED)
    end("no worker for agent 'a' took the job within 60s", JobState.FAILED)
    end("the agent's job failed", *running)
    # Its worker died, it was dispatched again, and no worker took it in time.
    lost = "worker AW_y disconnected while the job was running"
    end(f"{lost}; dispatched again, no worker took it", *running[:2], JobState.PENDING)
    end("instance a-v1-x was stopped while the job ran", *running)
    book.transition(book.jobs["AJ_0"], JobState.SUCCEEDED)  # ended: no change, nothing counted

    def count(kind: str) -> float:
        return registry.get_sample_value("failed_sessions_total", {"kind": kind}) or 0.0

    assert {k: count(k) for k in FAILURE_KINDS} == {
        "crashed": 1, "killed": 2, "exited": 1, "worker_lost": 4, "not_started": 1,
        "no_worker": 1, "other": 1,
    }  # fmt: skip
    assert failure_kind("Error: v2 is broken", JobState.RUNNING) == "crashed"  # Node's words


# -- deployed: the launcher reports the truth -------------------------------------------------


@pytest.mark.timeout(420)
async def test_deployed_sessions_that_raise_or_die_are_failed_with_the_reason_and_shown(
    server: Server, tmp_path: Path
) -> None:
    folder = tmp_path / "outcomes"
    shutil.copytree(AGENT_SRC, folder)
    markers = tmp_path / "markers"
    markers.mkdir()
    vf(server, folder, "create", "--name", "outcomes")
    vf(server, folder, "secrets", "set", f"MARKER_DIR={markers}")
    vf(server, folder, "deploy")

    expected = {
        "ok": ("succeeded", ""),
        "sigkill": ("failed", "job process killed by SIGKILL"),
        "exit": ("failed", "job process exited with code 3"),
        "raise": ("failed", "RuntimeError: v2 is broken"),
    }
    kinds = ("crashed", "killed", "exited")
    before = {k: server.metric("voicefleet_failed_sessions_total", kind=k) for k in kinds}
    lk = api.LiveKitAPI(server.url, DEV_KEY, DEV_SECRET)
    try:
        jobs = {}
        for end in expected:  # one at a time: the last failure is the "raise" one
            jobs[end] = await _dispatch(lk, "outcomes", f"outcome-{end}", end=end)
            job = await _ended(server, jobs[end])
            assert started(markers, jobs[end]), f"{end}: its entrypoint never ran: {job}"
            assert (job["state"], job["error"]) == expected[end], job
            assert job["version"] == "v1"
    finally:
        await lk.aclose()

    for kind in kinds:  # the server is shared: counted from where this test found them
        assert server.metric("voicefleet_failed_sessions_total", kind=kind) == before[kind] + 1
    status = api_get(server, "/agents/outcomes")["sessions"]["by_version"]["v1"]
    assert (status["ended"], status["failed"]) == (4, 3)
    assert status["last_failure"]["job_id"] == jobs["raise"]
    assert status["last_failure"]["error"] == "RuntimeError: v2 is broken"
    shown = vf(server, folder, "status").stdout
    assert "v1: 3 of 4 failed; last " in shown, shown
    assert f"({jobs['raise']}): RuntimeError: v2 is broken" in shown, shown


# -- unmanaged workers: what livekit-agents 1.8.9 reports by itself ---------------------------


@pytest.fixture
def unmanaged(server: Server, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The outcomes agent run as users run it without voicefleet: `python agent.py start`."""
    (tmp_path / "markers").mkdir()
    log = open(tmp_path / "unmanaged.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, str(AGENT_SRC / "agent.py"), "start"],
        env={
            **os.environ,
            "LIVEKIT_URL": server.ws_url, "LIVEKIT_API_KEY": DEV_KEY,
            "LIVEKIT_API_SECRET": DEV_SECRET, "LIVEKIT_AGENT_NAME": "unmanaged-outcomes",
            "HEALTH_PORT": str(_free_port()), "MARKER_DIR": str(tmp_path / "markers"),
        },
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    log.close()
    yield proc
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.timeout(300)
async def test_an_unmanaged_python_worker_reports_no_exception_and_no_reason_for_a_dead_process(
    server: Server, unmanaged: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    markers = tmp_path / "markers"
    await wait_for(lambda: server.workers("unmanaged-outcomes"), 60, "the worker to register")
    lk = api.LiveKitAPI(server.url, DEV_KEY, DEV_SECRET)
    try:
        raised = await _dispatch(lk, "unmanaged-outcomes", "unmanaged-raise", end="raise")
        died = await _dispatch(lk, "unmanaged-outcomes", "unmanaged-exit", end="exit")
        # JRP_NEVER: with no other worker, a job dispatched again would wait out the queue.
        held = await _dispatch(
            lk,
            "unmanaged-outcomes",
            "unmanaged-hold",
            JobRestartPolicy.JRP_NEVER,
            end="ok",
            hold=600,
        )
        job = await _ended(server, raised)
        # livekit-agents 1.8.9 judges a job by its process's exit code: an exception in the
        # entrypoint exits 0, succeeded. (Or now and then failed with no reason: without the
        # launcher, CPython gh-130895 turns an exit 0 into 255.) Never the exception itself.
        assert started(markers, raised)
        assert (job["state"], job["error"]) in (("succeeded", ""), ("failed", NO_REASON)), job
        job = await _ended(server, died)
        # A process that died is reported failed, with no reason (error="").
        assert (job["state"], job["error"]) == ("failed", NO_REASON), job
        assert failure_kind(job["error"], JobState.RUNNING) == "other"

        # A worker that dies takes its sessions with it: voicefleet sees that itself.
        await wait_for(lambda: started(markers, held), 60, "the held session to start")
        os.killpg(unmanaged.pid, signal.SIGKILL)
        job = await _ended(server, held)
        assert job["state"] == "failed" and "disconnected" in job["error"], job
        assert failure_kind(job["error"], JobState.RUNNING) == "worker_lost"
    finally:
        await lk.aclose()


# -- Node.js: what @livekit/agents 1.9 reports by itself --------------------------------------


@pytest.fixture(scope="session")
def node_agents() -> Path:
    """@livekit/agents from npm, installed once into the peers cache (tests/node/install.sh)."""
    if shutil.which("npm") is None or shutil.which("node") is None:
        pytest.skip("node/npm not found: the Node.js peer @livekit/agents cannot be installed")
    done = subprocess.run(
        [str(NODE_DIR / "install.sh")], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"tests/node/install.sh failed:\n{done.stderr}"
    return Path(done.stdout.strip().splitlines()[-1]) / "node_modules"


@pytest.mark.timeout(600)
async def test_a_node_worker_reports_no_job_status_and_keeps_its_jobs_until_it_goes(
    start_server: Callable[..., Server], node_agents: Path, tmp_path: Path
) -> None:
    server = start_server("--start-timeout", "5")
    markers = tmp_path / "markers"
    markers.mkdir()
    (tmp_path / "node_modules").symlink_to(node_agents)
    shutil.copy(NODE_DIR / "agent.mjs", tmp_path / "agent.mjs")
    log_path = tmp_path / "node.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["node", str(tmp_path / "agent.mjs"), "start"],
            cwd=tmp_path,
            env={
                **os.environ,
                "LIVEKIT_URL": server.ws_url, "LIVEKIT_API_KEY": DEV_KEY,
                "LIVEKIT_API_SECRET": DEV_SECRET, "AGENT_NAME": "node-outcomes",
                "HEALTH_PORT": str(_free_port()), "MARKER_DIR": str(markers),
            },
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    lk = api.LiveKitAPI(server.url, DEV_KEY, DEV_SECRET)
    try:
        [worker] = await wait_for(
            lambda: server.workers("node-outcomes"), 90, "the Node worker to register"
        )
        threw = await _dispatch(lk, "node-outcomes", "node-throws")
        clean = await _dispatch(lk, "node-outcomes", "node-clean", end="ok")
        for job_id in (threw, clean):
            marker = await wait_for(lambda j=job_id: started(markers, j), 60, f"{job_id} to run")
            # Its job process is done with it: whatever the worker says about it, it says now.
            await wait_for(lambda m=marker: not psutil.pid_exists(m["pid"]), 60, "job process exit")
        thrown = await wait_for(
            lambda: "v2 is broken" in log_path.read_text(errors="replace"), 30, "the error logged"
        )
        assert thrown
        # Past the start timeout: the jobs were not taken back (no second agent in the room).
        await wait_for(
            lambda: server.log().count("reports no job status; it stays") >= 2,
            60,
            "the start timeout to pass over both jobs",
        )
        for job_id in (threw, clean):
            job = server.job(job_id)
            # @livekit/agents 1.9 sends no UpdateJobStatus at all: never running, never ended.
            assert job is not None and job["state"] == "assigned", job
            assert job["worker_id"] == worker["id"] and job["started_at"] == 0, job
        assert server.metric("voicefleet_offers_total", outcome="not_started") == 0
        # They end when their worker goes.
        os.killpg(proc.pid, signal.SIGKILL)
        for job_id in (threw, clean):
            job = await _ended(server, job_id, timeout=60)
            assert job["state"] == "failed" and "disconnected" in job["error"], job
    finally:
        await lk.aclose()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert "error in entry function" in log_path.read_text(errors="replace")
