"""Run an unmodified LiveKit agent with a health port of voicefleet's choosing, and have its
worker report how each session really ended.

    <env python> launch.py --port N agent.py start

`python agent.py start` binds its health server to :8081, so a second instance on the same
machine fails. livekit-agents has no flag or variable for the port, only `port=` in the agent's
own code. This launcher leaves the agent's code alone: it gives AgentServer (livekit-agents
1.8.x) the port N when the agent did not choose one, then runs agent.py as `__main__`.
Likewise the drain timeout (livekit-agents' default: one hour, then it cuts its sessions)
becomes the agent's grace period (VOICEFLEET_GRACE_PERIOD) when the agent did not choose one.

Outcomes: livekit-agents 1.8.x reports a job's end from its job process's exit code alone, with
error="". An entrypoint that raises still exits 0, so the session is reported succeeded. The job
process forwards its "unhandled exception while running the job task" record to the worker, which
tags it with the job's id: the launcher keeps the exception's summary per job, and the worker's
final update for that job says JS_FAILED with "<Type>: <message>"; a job process that died says
how ("job process killed by SIGKILL", "job process exited with code 3"). And a clean session is
not reported failed for a race in reading its process's exit status (below).

It runs under the *version's* environment, where voicefleet is not installed: so it is a
script run by path, and uses only the standard library and livekit-agents.
"""

import importlib.util
import logging
import os
import signal
import sys
import threading
from typing import Any

# The record a job process logs when its entrypoint raised (livekit-agents 1.8.x,
# ipc/job_proc_lazy_main.py); the worker's log listener adds `job_id` to it.
CRASH_RECORD = "unhandled exception while running the job task"
# The error goes into every job listing and abort reason: one line, bounded.
MAX_ERROR = 300


def _give_port(port: int, grace: int | None) -> None:
    from livekit.agents import worker

    original = worker.AgentServer.__init__

    def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        original(self, *args, **kwargs)
        # A port the agent set itself is an int; the default is a ServerEnvOption.
        if isinstance(self._port, worker.ServerEnvOption):
            self._port = port
        if grace is not None and self._drain_timeout == worker.DRAIN_TIMEOUT:
            self._drain_timeout = grace

    worker.AgentServer.__init__ = __init__  # type: ignore[method-assign]


def _read_exit_status_once() -> None:
    """One thread at a time reads a forkserver child's exit status (CPython gh-130895).

    A job process's status comes once, down a pipe from the forkserver. When two threads poll
    the same child together (livekit-agents joins each job process on a thread while starting
    the next on another, and Process.start() polls every finished child), both find the pipe
    readable: one reads the code, the other reads EOF and records 255, often over the real
    code. A clean session was then reported failed ("exited with code 255"), about one in ten
    here. The lock is taken only once the pipe is readable, so no poll waits behind a blocked one.
    """
    from multiprocessing import connection, popen_forkserver

    original = popen_forkserver.Popen.poll
    lock = threading.Lock()

    def poll(self: Any, flag: int = os.WNOHANG) -> int | None:
        if self.returncode is None and flag != os.WNOHANG:
            connection.wait([self.sentinel])  # block, unlocked, until the status is there
        with lock:
            code: int | None = original(self, os.WNOHANG)
            return code

    popen_forkserver.Popen.poll = poll  # type: ignore[method-assign]


def summary(traceback_text: str) -> str:
    """The exception a formatted traceback ends with, as "<Type>: <first line of its message>"."""
    lines = traceback_text.splitlines()
    # The last traceback is the exception raised (earlier ones are its chained causes); its
    # frames are indented, and the first line after them names the exception.
    heads = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call")]
    for line in lines[heads[-1] + 1 if heads else 0 :]:
        if line.strip() and not line[0].isspace():
            return _bounded(line)
    # An exception group: every line sits behind "  | "; its own line has one space after.
    for line in lines:
        stripped = line.lstrip(" ")
        if stripped.startswith("| ") and not stripped[2:3].isspace():
            return _bounded(stripped[2:])
    return _bounded(next((line.strip() for line in reversed(lines) if line.strip()), ""))


def _bounded(line: str) -> str:
    line = line.strip() or "the entrypoint raised an exception"
    return line if len(line) <= MAX_ERROR else line[: MAX_ERROR - 1] + "…"


def process_end(exitcode: int | None, killed_by_worker: bool) -> str | None:
    """How a job process that ended badly ended, or None if it exited 0 (or is unknown)."""
    if exitcode is None or exitcode == 0:
        return None
    if exitcode > 0:
        return f"job process exited with code {exitcode}"
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        name = f"signal {-exitcode}"
    # The worker kills a job process that stops answering pings, passes its memory limit or
    # does not shut down in time; its own log says which.
    return f"job process killed by {name}" + (" (by its worker)" if killed_by_worker else "")


class Crashes(logging.Handler):
    """Per job id, the summary of the exception its entrypoint raised.

    Fed on the worker's log listener threads (one per job process), read on its event loop: a
    job process's records are all handled before the worker learns that the process ended
    (livekit-agents drains the listener first, for up to 2 s), so the job's last update knows.
    """

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self._by_job: dict[str, str] = {}
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        job_id = getattr(record, "job_id", None)
        # Forwarded records carry their traceback as text (exc_info does not cross processes).
        text = record.exc_text or ""
        if not isinstance(job_id, str) or not text or not str(record.msg).startswith(CRASH_RECORD):
            return
        with self._guard:
            self._by_job[job_id] = summary(text)

    def pop(self, job_id: str) -> str | None:
        with self._guard:
            return self._by_job.pop(job_id, None)


def _report_outcomes(crashes: Crashes) -> None:
    from livekit.agents import ipc, worker
    from livekit.protocol import agent

    logging.getLogger("livekit.agents").addHandler(crashes)
    original = worker.AgentServer._update_job_status
    ended = (ipc.job_executor.JobStatus.SUCCESS, ipc.job_executor.JobStatus.FAILED)

    async def _update_job_status(self: Any, proc: Any) -> None:
        info = proc.running_job
        error = None
        if info is not None and proc.status in ended:
            error = crashes.pop(info.job.id)
            if error is None and proc.status == ipc.job_executor.JobStatus.FAILED:
                # Thread executors have no process, hence no exit code: getattr.
                error = process_end(getattr(proc, "exitcode", None), getattr(proc, "killed", False))
        if error is None:
            await original(self, proc)
            return
        update = agent.UpdateJobStatus(
            job_id=info.job.id, status=agent.JobStatus.JS_FAILED, error=error
        )
        await self._queue_msg(agent.WorkerMessage(update_job=update))

    worker.AgentServer._update_job_status = _update_job_status  # type: ignore[method-assign]


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[1] != "--port":
        sys.exit("usage: launch.py --port N agent.py [args...]")
    port, entry, args = int(sys.argv[2]), os.path.abspath(sys.argv[3]), sys.argv[4:]
    raw_grace = os.environ.get("VOICEFLEET_GRACE_PERIOD", "")
    grace = int(raw_grace) if raw_grace.isdigit() else None
    _give_port(port, grace)
    _read_exit_status_once()
    try:
        _report_outcomes(Crashes())
    except (ImportError, AttributeError) as e:
        # Another livekit-agents than the one this was written for: the agent still runs, and
        # its sessions are reported as its worker reports them.
        print(f"voicefleet launcher: session outcomes as the worker reports them ({e!r})")
    sys.argv = [entry, *args]
    sys.path.insert(0, os.path.dirname(entry))
    spec = importlib.util.spec_from_file_location("__main__", entry)
    if spec is None or spec.loader is None:
        sys.exit(f"cannot load {entry}")
    module = importlib.util.module_from_spec(spec)
    # As for `python agent.py`: no __spec__, so multiprocessing's job processes re-import the
    # agent from its file (as __mp_main__) and find the functions the worker pickles.
    module.__spec__ = None
    sys.modules["__main__"] = module
    spec.loader.exec_module(module)


if __name__ == "__main__":
    main()
