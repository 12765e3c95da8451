"""A real livekit-server for tests and benchmarks, inside a network namespace of its own.

    with livekit_server(tmp_path / "livekit") as lk:  # a Netns, and the server started in it
        worker = lk.ns.popen([sys.executable, "agent.py", "start"], env={**os.environ, **lk.env()})
        await lk.call(lambda c: c.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(agent_name="my-agent", room="room-1")))

The namespace has `lo` and a veth pair that leads nowhere (see MEDIA_IP), no route out, so
nothing that runs in it can reach, or be reached from, this machine's real interfaces: the server,
the workers and the clients that exchange WebRTC media with it all run inside it. Every process in
it is ended by pid, and the namespace goes with them, when the `with` block ends, failed test or
not.

The server binary comes from `scripts/peers` (built from livekit-server's Go module and cached);
`server_binary()` finds it, building it first if it is missing.

How code gets into the namespace:
- a command or a worker: `ns.popen([...])` / `ns.run([...])` (`nsenter --net=...`, which then
  execs the command itself: the pid is the command's);
- Python client code in the test (`livekit-api`, httpx, aiohttp): `await ns.call(coro_fn)` or
  `ns.call_sync(fn)`. The function runs in a thread of its own that first joins the namespace
  with setns(2), on an event loop of its own. A network namespace belongs to a thread, not to the
  process, and a socket stays in the namespace it was made in: the sockets that thread (and the
  threads it starts, e.g. asyncio's resolver pool) makes are inside, the test's own loop and
  every other thread stay outside. The thread ends with the call, so no thread is left behind in
  the namespace. Objects bound to an event loop (an `api.LiveKitAPI`) must be made and closed
  within one call.
- code that makes its sockets in threads of its own (the `livekit` rtc SDK: Rust, tokio) must
  run as a subprocess: `ns.popen([sys.executable, script])`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import itertools
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx
from livekit import api

from tests.support import DEV_KEY, DEV_SECRET, admin_token, with_us

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "scripts" / "peers"
CLONE_NEWNET = 0x40000000

T = TypeVar("T")

_counter = itertools.count()


class BinaryUnavailable(RuntimeError):
    """livekit-server is not built and cannot be built here (the message says why)."""


def server_binary(build: bool = True, timeout: float = 1800) -> Path:
    """The livekit-server binary `scripts/peers` built; built now if missing and `build`.

    Raises BinaryUnavailable with `scripts/peers`'s own explanation (no Go, build failed)."""
    found = subprocess.run([str(PEERS), "path", "livekit-server"], capture_output=True, text=True)
    if found.returncode == 0:
        return Path(found.stdout.strip())
    if not build:
        raise BinaryUnavailable(found.stderr.strip())
    built = subprocess.run(
        [str(PEERS), "build", "livekit-server"], capture_output=True, text=True, timeout=timeout
    )
    if built.returncode != 0:
        tail = "\n".join(built.stderr.strip().splitlines()[-15:])
        raise BinaryUnavailable(f"scripts/peers could not build livekit-server:\n{tail}")
    return Path(built.stdout.strip().splitlines()[-1])


def server_built() -> bool:
    """Whether the binary is already there (cheap; never builds)."""
    try:
        server_binary(build=False)
    except BinaryUnavailable:
        return False
    return True


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET): {os.strerror(err)}")


# Inside a namespace: IPv6 off (one address family: fewer ICE candidates, same results every
# run), `lo` up, and a veth pair whose one end carries MEDIA_IP. The pair connects nothing: it is
# there because libwebrtc (the `livekit` rtc SDK, so every livekit-agents job) never gathers ICE
# candidates on a loopback interface, and a kernel without the `dummy` module still has veth.
# Packets between addresses of one namespace never leave it: the kernel delivers them through lo.
MEDIA_IP = "10.203.0.1"
_SETUP = f"""
for f in /proc/sys/net/ipv6/conf/all/disable_ipv6 /proc/sys/net/ipv6/conf/default/disable_ipv6; do
  if [ -e "$f" ]; then echo 1 > "$f"; fi
done
ip link set lo up
ip link add vf0 type veth peer name vf1
ip addr add {MEDIA_IP}/24 dev vf0
ip link set vf1 up
ip link set vf0 up
echo ready
exec cat >/dev/null
"""


class Netns:
    """A fresh network namespace: `lo` and a veth pair with MEDIA_IP, nothing else (no route
    out); ended, with every process in it, on exit.

    It is held by a small process made with `unshare --net` that waits on a pipe from us: the
    namespace has no name in /run/netns that could leak, and if this process dies before
    `close()`, the holder sees the pipe close and exits (the processes started in it still need
    `close()`, as any test's subprocesses do)."""

    media_ip = MEDIA_IP

    def __init__(self, name: str | None = None) -> None:
        self.name = name or f"vf-{os.getpid()}-{next(_counter)}"
        self._holder: subprocess.Popen[bytes] | None = None
        self._fd = -1
        self._ident: tuple[int, int] = (0, 0)
        self.path = ""

    def open(self) -> Netns:
        self._holder = subprocess.Popen(
            ["unshare", "--net", "--", "sh", "-euc", _SETUP, self.name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        assert self._holder.stdout is not None and self._holder.stderr is not None
        line = self._holder.stdout.readline()
        if line.strip() != b"ready":
            code = self._holder.wait(5)
            why = self._holder.stderr.read().decode(errors="replace").strip()
            raise RuntimeError(f"could not make a network namespace (exit {code}): {why}")
        self.path = f"/proc/{self._holder.pid}/ns/net"
        # Our own handle on it: setns() and the process scan work even after the holder is gone.
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        st = os.fstat(self._fd)
        self._ident = (st.st_dev, st.st_ino)
        return self

    def __enter__(self) -> Netns:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- processes -------------------------------------------------------------------------

    def _argv(self, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
        if self._fd < 0:
            raise RuntimeError("namespace not open")
        # nsenter joins the namespace, then execs the command: no extra process in between.
        return ["nsenter", f"--net={self.path}", "--", *map(str, argv)]

    def popen(self, argv: Sequence[str | os.PathLike[str]], **kwargs: Any) -> subprocess.Popen[Any]:
        """subprocess.Popen, inside the namespace: it returns once the process is in it (and so
        in `pids()`, which `close()` ends), or has already exited."""
        proc = subprocess.Popen(self._argv(argv), **kwargs)
        deadline = time.monotonic() + 10
        while not self._holds(proc.pid) and proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"nsenter did not enter {self.name} within 10s: {argv}")
            time.sleep(0.002)
        return proc

    def run(
        self, argv: Sequence[str | os.PathLike[str]], **kwargs: Any
    ) -> subprocess.CompletedProcess[Any]:
        """subprocess.run, inside the namespace."""
        return subprocess.run(self._argv(argv), **kwargs)

    def pids(self) -> list[int]:
        """Every process whose network namespace is this one (the holder included)."""
        me = os.getpid()
        return [
            int(e.name)
            for e in os.scandir("/proc")
            if e.name.isdigit() and int(e.name) != me and self._holds(int(e.name))
        ]

    def _holds(self, pid: int) -> bool:
        try:
            st = os.stat(f"/proc/{pid}/ns/net")
        except OSError:  # gone, a zombie, or a kernel thread
            return False
        return (st.st_dev, st.st_ino) == self._ident

    # -- Python code inside ----------------------------------------------------------------

    def call_sync(self, fn: Callable[[], T], timeout: float | None = 60) -> T:
        """Run `fn()` in a new thread that has joined the namespace; return what it returns."""
        return self._submit(fn).result(timeout)

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run the coroutine `fn()` makes on an event loop of its own, in a new thread that has
        joined the namespace; await its result from the caller's loop."""
        return await asyncio.wrap_future(self._submit(lambda: asyncio.run(_coro(fn))))

    def _submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        if self._fd < 0:
            raise RuntimeError("namespace not open")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        fd = self._fd

        def target() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                _setns(fd)  # this thread only; it ends with the call
                future.set_result(fn())
            except BaseException as e:  # handed to the caller
                future.set_exception(e)

        threading.Thread(target=target, name=f"netns-{self.name}", daemon=True).start()
        return future

    # -- the end ---------------------------------------------------------------------------

    def close(self, grace: float = 5.0) -> None:
        """SIGTERM every process in the namespace, SIGKILL what is left after `grace` seconds,
        then let the holder go: with no process and no handle left, the kernel frees it."""
        if self._fd < 0:
            return
        holder = self._holder.pid if self._holder is not None else -1
        others = [pid for pid in self.pids() if pid != holder]
        _signal(others, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while others and time.monotonic() < deadline:
            time.sleep(0.05)
            others = [pid for pid in self.pids() if pid != holder]
        _signal(others, signal.SIGKILL)
        if self._holder is not None:
            assert self._holder.stdin is not None
            self._holder.stdin.close()  # its `cat` sees the end of input and exits
            try:
                self._holder.wait(5)
            except subprocess.TimeoutExpired:
                self._holder.kill()
                self._holder.wait()
            for pipe in (self._holder.stdout, self._holder.stderr):
                if pipe is not None:
                    pipe.close()
        # SIGKILLed processes take a moment to leave it.
        deadline = time.monotonic() + 5
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.close(self._fd)
        self._fd = -1


async def _coro(fn: Callable[[], Awaitable[T]]) -> T:
    return await fn()


def _signal(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


# -- the server ------------------------------------------------------------------------------


class LiveKitServer:
    """livekit-server, single node (no Redis), in `ns`, with a config generated in `workdir`.

    Fixed ports are fine: the namespace has its own port space, so runs in parallel never
    collide. Signal (HTTP and WebSocket) on 127.0.0.1:`port`; WebRTC over UDP only, on
    `udp_port` (one muxed port), with `node_ip` (127.0.0.1) as the only candidate address. The
    clients' candidates are on MEDIA_IP (libwebrtc skips loopback); both are local addresses of
    the namespace. `node_ip=MEDIA_IP` puts the server's candidate there too."""

    api_key = "devkey"

    def __init__(
        self,
        ns: Netns,
        workdir: Path,
        *,
        port: int = 7880,
        tcp_port: int = 0,
        udp_port: int = 7882,
        node_ip: str = "127.0.0.1",
        log_level: str = "info",
        extra_yaml: str = "",
        binary: Path | None = None,
    ) -> None:
        self.ns = ns
        self.workdir = workdir
        self.port, self.tcp_port, self.udp_port = port, tcp_port, udp_port
        self.node_ip = node_ip
        self.log_level = log_level
        self.extra_yaml = extra_yaml
        self.binary = binary
        # At least 32 characters: livekit-server outside development mode complains otherwise.
        self.api_secret = secrets.token_hex(24)
        self.config_path = workdir / "livekit.yaml"
        self.log_path = workdir / "livekit-server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """What an agent worker or a client needs to find this server (inside the namespace)."""
        return {
            "LIVEKIT_URL": self.ws_url,
            "LIVEKIT_API_KEY": self.api_key,
            "LIVEKIT_API_SECRET": self.api_secret,
        }

    def client(self) -> api.LiveKitAPI:
        """A livekit-api client; make it, use it and close it within one `ns.call`."""
        return api.LiveKitAPI(self.url, self.api_key, self.api_secret)

    async def call(self, fn: Callable[[api.LiveKitAPI], Awaitable[T]]) -> T:
        """`fn(client)` with a fresh livekit-api client, inside the namespace; e.g.
        `await lk.call(lambda c: c.room.list_rooms(api.ListRoomsRequest()))`."""

        async def inside() -> T:
            client = self.client()
            try:
                return await fn(client)
            finally:
                await client.aclose()

        return await self.ns.call(inside)

    def config(self) -> str:
        """The YAML config (livekit-server v1.13.5's pkg/config): its own defaults for the rest.
        Parsing is strict (livekit-server's default): a key it does not know fails the start."""
        return f"""\
# Generated by tests/livekit.py: single node, inside a network namespace of the test's own.
port: {self.port}  # signal: HTTP (Twirp API) and WebSocket (clients, agent workers)
bind_addresses: ["127.0.0.1"]
development: false  # production defaults: no built-in devkey/secret, real key checks
keys:  # the one API key; the secret is random and long (>= 32 characters)
  {self.api_key}: {self.api_secret}
logging:  # to stdout, which start() sends to livekit-server.log
  level: {self.log_level}
  json: true
  pion_level: error
# No redis: a single node, its router and stores in memory.
rtc:
  udp_port: {self.udp_port}  # ICE over UDP, all peer connections muxed on this one port
  tcp_port: {self.tcp_port}  # ICE over TCP: 0 = off, media is UDP only
  allow_tcp_fallback: false  # never steer a client to ICE/TCP or TURN/TLS
  node_ip: {self.node_ip}  # the address in our candidates; set, so nothing is discovered
  use_external_ip: false  # no external IP discovery (it would ask STUN servers)
  stun_servers: []  # and no STUN at all (with node_ip set, none is added either)
  enable_loopback_candidate: true  # pion skips loopback interfaces unless told
turn:
  enabled: false  # no embedded TURN server, and no turn_servers given to clients
{self.extra_yaml}"""

    def start(self, timeout: float = 30.0) -> LiveKitServer:
        if self.binary is None:
            self.binary = server_binary()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config())
        with open(self.log_path, "ab") as log:
            self.proc = self.ns.popen(
                with_us([str(self.binary), "--config", str(self.config_path)]),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self.ns.call_sync(self._answers):
            if self.proc.poll() is not None:
                raise RuntimeError(f"livekit-server exited ({self.proc.returncode}):\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"livekit-server not answering after {timeout}s:\n{self.log()}")
            time.sleep(0.1)
        return self

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.url, timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def __enter__(self) -> LiveKitServer:
        return self if self.proc is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_entries(self, msg: str | None = None) -> list[dict[str, Any]]:
        """The server's log lines (JSON), those with message `msg` if given."""
        found = []
        for line in self.log().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a partial last line, or a panic's text
            if isinstance(entry, dict) and (msg is None or entry.get("msg") == msg):
                found.append(entry)
        return found

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM (it then waits for its rooms to close), SIGKILL after `grace` seconds."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class NsWorker:
    """A real livekit-agents worker script, started with `start` inside the server's namespace,
    in a process group of its own (its job processes are its children)."""

    def __init__(
        self, server: LiveKitServer, script: Path, log_path: Path, env: Mapping[str, str]
    ) -> None:
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "wb") as log:
            self.proc = server.ns.popen(
                with_us([sys.executable, str(script), "start"]),
                env={**os.environ, **server.env(), **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.id = ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def registered(self) -> str | None:
        """The worker id once it has registered with the server (else None)."""
        if self.proc.poll() is not None:
            raise AssertionError(f"worker exited ({self.proc.returncode}):\n{self.log()}")
        for line in self.log().splitlines():
            if '"message": "registered worker"' in line:
                self.id = str(json.loads(line)["id"])
                return self.id
        return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@contextlib.contextmanager
def livekit_server(workdir: Path, **options: Any) -> Iterator[LiveKitServer]:
    """A namespace and a started server in it; both ended on exit."""
    with Netns() as ns, LiveKitServer(ns, workdir, **options) as server:
        yield server


class NsVoicefleet:
    """`vf server --dev` with the LiveKit server as its SFU and upstream (gateway mode), inside
    that server's namespace; its API is called from inside too."""

    def __init__(
        self,
        lk: LiveKitServer,
        data_dir: Path,
        api_secret: str = "",
        log_level: str = "info",
        port: int = 0,
    ) -> None:
        """`port`: 0 picks a free one; a fixed one (the namespace's own port space: no
        collision) lets workers find a server restarted on the same data dir again."""
        self.lk = lk
        self.data_dir = data_dir
        self.log_path = data_dir / "server.log"
        self.ready = data_dir / "ready.json"
        self.url = ""
        data_dir.mkdir(parents=True, exist_ok=True)
        self.ready.unlink(missing_ok=True)  # a last run's: this run writes its own
        with open(self.log_path, "ab") as log:
            self.proc = lk.ns.popen(
                [
                    sys.executable, "-m", "voicefleet", "server", "--dev",
                    "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir),
                    "--ready-file", str(self.ready), "--log-level", log_level,
                    "--livekit-url", lk.ws_url,
                    "--livekit-api-key", lk.api_key,
                    "--livekit-api-secret", api_secret or lk.api_secret,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip

    def started(self, timeout: float = 60) -> NsVoicefleet:
        """Wait for the ready file (a fixture's setup: no event loop to wait on here)."""
        deadline = time.monotonic() + timeout
        while not self.ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"vf server exited ({self.proc.returncode}):\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"vf server not ready after {timeout}s:\n{self.log()}")
            time.sleep(0.05)
        self.url = json.loads(self.ready.read_text())["url"]
        return self

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def worker_env(self, **env: str) -> dict[str, str]:
        """A worker of voicefleet's (not LiveKit's): its url and the dev project's key."""
        return {
            "LIVEKIT_URL": self.ws_url,
            "LIVEKIT_API_KEY": DEV_KEY,
            "LIVEKIT_API_SECRET": DEV_SECRET,
            **env,
        }

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        async def inside() -> Any:
            async with httpx.AsyncClient(base_url=self.url, timeout=10) as client:
                r = await client.request(
                    method, path, headers={"Authorization": f"Bearer {admin_token()}"}, **kwargs
                )
                if r.status_code == 404:
                    return None
                r.raise_for_status()
                return r.json()

        return await self.lk.ns.call(inside)

    async def job(self, job_id: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = await self.request("GET", f"/api/v1/jobs/{job_id}")
        return found

    async def jobs(self, room: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = await self.request(
            "GET", "/api/v1/jobs", params={"room": room}
        )
        return found

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- calls: the caller simulator and `vf agent` inside the namespace ------------------------

VOICE_AGENT = ROOT / "examples" / "voice_agent" / "agent.py"


class Caller:
    """tests/caller.py in the namespace: its stdout (JSON lines) goes to a file we read."""

    def __init__(
        self, lk: LiveKitServer, room: str, folder: Path, *args: str, until: bool = False
    ) -> None:
        """`until`: the call goes on until `finish()` (then 2 utterances more), however long
        what it must outlast takes; else `--utterances` (in `args`) and no more."""
        self.out = folder / f"caller-{room}.log"
        self.report_path = folder / f"caller-{room}.json"
        self.until = folder / f"caller-{room}.finish"
        if until:
            args = (*args, "--until", str(self.until))
        with open(self.out, "wb") as out:
            self.proc = lk.ns.popen(
                [
                    sys.executable, "-m", "tests.caller", "--room", room,
                    "--report", str(self.report_path), *args,
                ],
                env={**os.environ, **lk.env()},
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        print(f"caller log: {self.out}")

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for line in self.out.read_text(errors="replace").splitlines():
            if line.startswith('{"event": '):
                event = json.loads(line)
                if event["event"] == name:
                    found.append(event)
        return found

    def joined(self) -> dict[str, Any] | None:
        if self.proc.poll() is not None and not self.events("joined"):
            raise AssertionError(f"the caller exited:\n{self.out.read_text()}")
        return next(iter(self.events("joined")), None)

    def report(self) -> dict[str, Any] | None:
        if self.proc.poll() is None:
            return None
        if not self.report_path.exists():
            raise AssertionError(f"the caller wrote no report:\n{self.out.read_text()}")
        found: dict[str, Any] = json.loads(self.report_path.read_text())
        return found

    def finish(self) -> None:
        """The call may end now (a caller started with `until`): after 2 more utterances."""
        self.until.touch()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def print_figures(how: str, report: dict[str, Any]) -> None:
    replies = ", ".join(f"{u['reply_ms']} ms" for u in report["utterances"])
    gaps = ", ".join(f"{g['ms']} ms at {g['at_s']} s" for g in report["gaps"]) or "none"
    print(
        f"\n[{how}] join {report['join_ms']} ms; join -> first agent audio "
        f"{report['join_to_first_audio_ms']} ms; utterance end -> reply: {replies}; "
        f"gaps > 100 ms while the agent spoke: {gaps}; stalls in arrival: "
        f"{[s['ms'] for s in report['stalls']]}, last frame late {report['late_ms']} ms"
    )


def vf_agent(
    folder: Path, url: str, *args: str, ns: LiveKitServer | None = None
) -> subprocess.CompletedProcess[str]:
    """`vf agent …` in `folder` against the server at `url` (inside `ns`'s namespace if given)."""
    argv = [sys.executable, "-m", "voicefleet", "agent", *args]
    env = {**os.environ, "VF_URL": url, "VF_API_KEY": DEV_KEY, "VF_API_SECRET": DEV_SECRET}
    options: dict[str, Any] = {"cwd": folder, "env": env, "capture_output": True, "text": True}
    done = ns.ns.run(argv, timeout=600, **options) if ns else subprocess.run(argv, **options)
    assert done.returncode == 0, f"vf agent {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done
