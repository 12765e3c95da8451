"""The local runtime: each instance is a child process in its own process group.

One supervisor task per instance does everything for it, in this order each tick: notice the
process ended (restart it with backoff unless it was draining or stopping), check its health
port, rotate its log. The process writes its output straight to a file and lives in its own
session, so it outlives a restart of the server, which then adopts it back by pid and start time.

A Node.js agent (a spec with a `command`) runs as `node --import <preload> <entry> start`. Its
worker (@livekit/agents) binds its health server to 8081 in production, and only the agent's
own ServerOptions({port}) changes that (no flag, no variable): the preload, a data: URL that
holds the port, turns the worker's listen on 8081 into one on the port voicefleet chose. The
port is thus on the command line, where adoption reads it back, as `--port N` for Python. A
second preload, node_jobs.mjs, has the worker report its sessions' status, which @livekit/agents
does not (the Python launcher, launch.py, does the same for livekit-agents).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from voicefleet.runtime import (
    SECRETS_ENV,
    InstanceSpec,
    InstanceState,
    InstanceStatus,
)
from voicefleet.runtime.base import RuntimeBase

log = logging.getLogger("voicefleet.runtime")

LAUNCHER = Path(__file__).with_name("launch.py")
# Loaded into each Node.js instance: reports how its sessions go (node_jobs.mjs says why).
NODE_JOBS = Path(__file__).with_name("node_jobs.mjs")
STARTING_NICENESS = 10
# Exit codes of a worker that finished its sessions after SIGTERM: livekit-agents for Python
# exits 0, @livekit/agents for Node.js 143 (128 + SIGTERM) by design.
DRAINED = frozenset({0, 128 + signal.SIGTERM})
NODE_DEFAULT_PORT = 8081  # @livekit/agents' health port in production (`start`)
NODE_PRELOAD = """/* voicefleet-health-port={port} */
import http from 'node:http';
const listen = http.Server.prototype.listen;
http.Server.prototype.listen = function (...args) {{
  const [first] = args;
  if (first === {default} || (first && typeof first === 'object' && first.port === {default})) {{
    args[0] = typeof first === 'object' ? {{ ...first, port: {port} }} : {port};
    http.Server.prototype.listen = listen;
  }}
  return listen.apply(this, args);
}};
"""
_NODE_PORT = re.compile(r"voicefleet-health-port=(\d+)")


def node_preload(port: int) -> str:
    """The `--import` argument that moves a Node.js worker's health server to `port`."""
    code = NODE_PRELOAD.format(port=port, default=NODE_DEFAULT_PORT)
    return "data:text/javascript," + urllib.parse.quote(code)


def _health_port(cmdline: list[str]) -> int:
    """The health port an instance was started with, from its command line."""
    if "--port" in cmdline:
        return int(cmdline[cmdline.index("--port") + 1])
    for arg in cmdline:
        if arg.startswith("data:text/javascript,"):
            found = _NODE_PORT.search(urllib.parse.unquote(arg))
            if found:
                return int(found.group(1))
    raise ValueError("no health port on the command line")


def _renice(pid: int, niceness: int) -> None:
    """Back to normal priority once serving: the worker and every process it started so far
    (its job processes are forked from these, and inherit it)."""
    try:
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                proc.nice(niceness)
    except psutil.NoSuchProcess:
        pass
    except psutil.AccessDenied:
        log.info("cannot raise the priority of a started instance back (needs CAP_SYS_NICE)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _signal_group(pid: int, sig: signal.Signals) -> None:
    if pid <= 0:  # never started: killpg(0) would signal voicefleet's own group
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def write_secret_files(spec: InstanceSpec) -> dict[str, str]:
    """The instance's file secrets, in its own directory (0700; files 0600, owner only): the
    variable that names it, or nothing when the agent has no file secrets."""
    folder = spec.secrets_dir
    if folder is None or not spec.files:
        return {}
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)  # were it there already, with other modes
    for old in folder.iterdir():  # a restart after `secrets unset`: only the current ones
        if old.name not in spec.files:
            old.unlink(missing_ok=True)
    for name, content in spec.files.items():
        path = folder / name
        path.unlink(missing_ok=True)  # a fresh file: no other owner's, no link followed
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(content)
    return {SECRETS_ENV: str(folder)}


def remove_secret_files(spec: InstanceSpec) -> None:
    if spec.secrets_dir is not None:
        shutil.rmtree(spec.secrets_dir, ignore_errors=True)


@dataclass(eq=False)
class _Instance:
    state: InstanceState
    proc: asyncio.subprocess.Process | None = None  # None when adopted after a restart
    draining: bool = False
    stopping: bool = False
    unhealthy: int = 0
    supervisor: asyncio.Task[None] | None = None
    killer: asyncio.Task[None] | None = None
    killed_at_grace: bool = False  # its drain outlived the grace period: killed here
    grace: float = 0.0  # how long its drain may take (set when drained)
    exited: asyncio.Event = field(default_factory=asyncio.Event)


class LocalRuntime(RuntimeBase[_Instance]):
    def __init__(
        self,
        *,
        backoff_initial: float = 1.0,
        backoff_max: float = 30.0,
        stable_after: float = 60.0,
        tick: float = 0.5,
        stop_timeout: float = 10.0,
        log_max_bytes: int = 20 * 2**20,
        log_keep: int = 3,
    ) -> None:
        super().__init__()
        self.backoff_initial, self.backoff_max = backoff_initial, backoff_max
        self.stable_after, self.tick, self.stop_timeout = stable_after, tick, stop_timeout
        self.log_max_bytes, self.log_keep = log_max_bytes, log_keep
        self._http = httpx.AsyncClient(timeout=2.0)

    # -- starting -----------------------------------------------------------------------------

    async def start(self, spec: InstanceSpec) -> InstanceState:
        inst = _Instance(InstanceState(spec=spec))
        await self._spawn(inst)  # known only once it runs: nothing to signal if this fails
        self._instances[spec.instance_id] = inst
        inst.supervisor = asyncio.create_task(self._supervise(inst))
        return inst.state

    async def _spawn(self, inst: _Instance) -> None:
        spec = inst.state.spec
        port = _free_port()
        spec.log_dir.mkdir(parents=True, exist_ok=True)
        files_env = write_secret_files(spec)
        with open(inst.state.log_path, "ab") as out:
            out.write(f"--- voicefleet: starting {spec.instance_id} ({spec.version})\n".encode())
            out.flush()
            if spec.command:  # Node.js: node --import <health port> --import <jobs> <entry> start
                node, *args = spec.command
                jobs = NODE_JOBS.as_uri()
                argv = [node, "--import", node_preload(port), "--import", jobs, *args]
            else:
                argv = [str(spec.python), str(LAUNCHER), "--port", str(port), spec.entry, "start"]
            inst.proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=spec.workdir,
                env={
                    **spec.env,
                    **files_env,
                    "PATH": os.environ.get("PATH", ""),
                    "PYTHONUNBUFFERED": "1",
                },
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # its own group: signals reach its job processes too
            )  # fmt: skip
        inst.state.pid = inst.proc.pid
        proc = psutil.Process(inst.proc.pid)
        inst.state.started_at = proc.create_time()
        # Starting a worker (imports, prewarmed processes) takes seconds of CPU; at a lower
        # priority it slows the instances serving calls less. Back to normal once healthy.
        with contextlib.suppress(psutil.Error):
            proc.nice(STARTING_NICENESS)
        inst.state.health_port = port
        inst.exited.clear()
        if inst.draining or inst.stopping:
            # Drained or stopped while this process was being started again after a crash:
            # it is told now, or it would run on unwatched.
            if inst.stopping:
                inst.grace = self.stop_timeout
            self._terminate(inst)
            return
        self._set(inst, InstanceStatus.STARTING)

    async def adopt(self, spec: InstanceSpec, pid: int, started_at: float) -> InstanceState | None:
        """Take back an instance a previous server started, if that very process still runs."""
        if pid <= 0:
            remove_secret_files(spec)
            return None  # none was recorded (it never started)
        try:
            proc = psutil.Process(pid)
            # A pid can be reused: the start time tells our process from a newer one.
            if abs(proc.create_time() - started_at) > 1.0 or not _alive(pid):
                remove_secret_files(spec)  # it ended while the server was down
                return None
            # ... and its folder tells this data dir's instance from one of another data dir
            # holding the same records (a restored backup, a copy): that one is not ours.
            if os.path.realpath(proc.cwd()) != os.path.realpath(spec.workdir):
                return None
            port = _health_port(proc.cmdline())
        except (psutil.Error, ValueError, IndexError):
            remove_secret_files(spec)
            return None
        state = InstanceState(spec=spec, pid=pid, started_at=started_at, health_port=port)
        inst = _Instance(state)
        self._instances[spec.instance_id] = inst
        inst.supervisor = asyncio.create_task(self._supervise(inst))
        return state

    # -- the supervisor -----------------------------------------------------------------------

    async def _exit_code(self, inst: _Instance) -> int | None:
        """The exit code if the process ended (None if it still runs)."""
        if inst.proc is not None:
            return inst.proc.returncode
        if _alive(inst.state.pid):
            return None
        return -1  # adopted: not our child, its code is lost

    async def _supervise(self, inst: _Instance) -> None:
        backoff = self.backoff_initial
        while True:
            await asyncio.sleep(self.tick)
            code = await self._exit_code(inst)
            if code is None:
                await self._check_health(inst)
                try:
                    self._rotate(inst)
                except OSError as e:  # a full disk must not end the supervision
                    log.warning("log rotation failed: %s", e)
                if time.time() - inst.state.started_at > self.stable_after:
                    backoff = self.backoff_initial
                continue
            inst.state.last_exit = code
            inst.exited.set()
            if inst.killer is not None:
                inst.killer.cancel()
            _signal_group(inst.state.pid, signal.SIGKILL)  # leftovers of its group, if any
            if inst.draining or inst.stopping:
                remove_secret_files(inst.state.spec)
                if inst.draining and code not in DRAINED and not inst.killed_at_grace:
                    self._set(inst, InstanceStatus.FAILED)  # died mid-drain: not our doing
                self._set(inst, InstanceStatus.STOPPED)
                return
            inst.state.restarts += 1
            self._set(inst, InstanceStatus.FAILED)
            log.warning(
                "instance exited; restarting",
                extra={"instance": inst.state.spec.instance_id, "code": code, "in": backoff},
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.backoff_max)
            if inst.draining or inst.stopping:
                remove_secret_files(inst.state.spec)
                self._set(inst, InstanceStatus.STOPPED)
                return
            try:
                await self._spawn(inst)
            except Exception:  # e.g. its environment was removed: try again after the backoff
                log.exception(
                    "instance did not start", extra={"instance": inst.state.spec.instance_id}
                )

    async def _check_health(self, inst: _Instance) -> None:
        if inst.draining or inst.stopping:
            return
        try:
            r = await self._http.get(f"http://127.0.0.1:{inst.state.health_port}/")
            healthy = r.status_code == 200
        except httpx.HTTPError:
            healthy = False
        if healthy:
            inst.unhealthy = 0
            if inst.state.status != InstanceStatus.READY:
                _renice(inst.state.pid, 0)
            self._set(inst, InstanceStatus.READY)
        elif inst.state.status == InstanceStatus.READY:
            inst.unhealthy += 1
            if inst.unhealthy in (3, 30, 300):
                log.warning("instance unhealthy", extra={"instance": inst.state.spec.instance_id})

    def _rotate(self, inst: _Instance) -> None:
        path = inst.state.log_path
        try:
            if path.stat().st_size <= self.log_max_bytes:
                return
        except FileNotFoundError:
            return
        # Copy-truncate: the process keeps its O_APPEND descriptor and writes on at offset 0.
        for i in range(self.log_keep - 1, 0, -1):
            older = path.with_name(f"{path.name}.{i}")
            if older.exists():
                older.replace(path.with_name(f"{path.name}.{i + 1}"))
        shutil.copyfile(path, path.with_name(f"{path.name}.1"))
        with open(path, "r+b") as f:
            f.truncate(0)

    # -- stopping -----------------------------------------------------------------------------

    async def drain(
        self, instance_id: str, grace: float | None = None, signalled: bool = False
    ) -> None:
        """SIGTERM now (livekit-agents finishes its sessions, then exits); SIGKILL after grace.

        `signalled`: it had its SIGTERM already (adopted after a server restart mid-drain). A
        second SIGTERM makes livekit-agents exit at once, cutting its calls: never send one."""
        inst = self._instances.get(instance_id)
        if inst is None or inst.draining:
            return
        inst.draining = True
        inst.grace = inst.state.spec.grace_period if grace is None else grace
        if inst.exited.is_set():
            # Crashed: waiting out its restart backoff (then it stays down), or being started
            # again (then the new process is told as soon as it runs).
            return
        self._set(inst, InstanceStatus.DRAINING)
        self._terminate(inst, signalled)

    def _terminate(self, inst: _Instance, signalled: bool = False) -> None:
        """SIGTERM (unless it had it), and SIGKILL if it still runs after its grace."""
        if not signalled and inst.state.pid > 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(inst.state.pid, signal.SIGTERM)
        inst.killer = asyncio.create_task(self._kill_after(inst))

    async def _kill_after(self, inst: _Instance) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(inst.exited.wait(), inst.grace)
            return
        log.warning(
            "grace period over: killing instance",
            extra={"instance": inst.state.spec.instance_id, "grace": inst.grace},
        )
        inst.killed_at_grace = True
        _signal_group(inst.state.pid, signal.SIGKILL)

    async def stop(self, instance_id: str) -> None:
        """Stop now: SIGTERM, then SIGKILL after `stop_timeout`. For instances with no sessions."""
        inst = self._instances.get(instance_id)
        if inst is None:
            return
        inst.stopping = True
        if not inst.exited.is_set() and inst.state.pid:
            _signal_group(inst.state.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(inst.exited.wait(), self.stop_timeout)
            except TimeoutError:
                _signal_group(inst.state.pid, signal.SIGKILL)
        remove_secret_files(inst.state.spec)
        self._set(inst, InstanceStatus.STOPPED)

    async def close(self, leave_running: bool) -> None:
        if not leave_running:
            await asyncio.gather(*(self.stop(i) for i in list(self._instances)))
        for inst in self._instances.values():
            for task in (inst.supervisor, inst.killer):
                if task is not None:
                    task.cancel()
        await self._http.aclose()


if sys.platform == "win32":  # pragma: no cover
    raise ImportError("the local runtime needs POSIX process groups")
