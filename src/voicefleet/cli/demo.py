"""`vf demo`: the embedded server deploys the example agent and serves sessions, shown live.

Everything a user would do by hand, in order: `vf server`, `vf agent create`, `vf agent
deploy`, sessions through LiveKit's dispatch API, then a second deploy while those sessions
are in flight, to show that none of them is cut.

With a real livekit-server built (`scripts/peers build livekit-server`), the sessions are real
calls: livekit-server, `vf server` and the agent's instances run in a network namespace of their
own (the checkout's test rig, tests/livekit.py; it needs root), and in each room the caller
simulator (tests/caller.py) speaks to the agent, which answers every utterance; each call's
figures are printed. Without the binary, or where no namespace can be made, the sessions are
synthetic (the agent listens to bundled speech), as they always were.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.live import Live
from rich.table import Table

from voicefleet.control.projects import DEV_KEY, DEV_SECRET
from voicefleet.protocol import tokens

console = Console()
STYLE = {"succeeded": "green", "failed": "red", "terminated": "yellow", "running": "cyan"}
ENDED = {"succeeded", "failed", "terminated"}
AGENT_NAME = "voice-agent"


class DemoError(Exception):
    pass


def _admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens.mint_admin(DEV_KEY, DEV_SECRET)}"}


def _table(jobs: list[dict[str, Any]]) -> Table:
    t = Table(title="sessions")
    for col in ("room", "version", "instance", "state", "dispatch → assigned", "detail"):
        t.add_column(col)
    for j in sorted(jobs, key=lambda j: j["created_at"]):
        latency = (
            f"{(j['assigned_at'] - j['created_at']) * 1000:.1f} ms" if j["assigned_at"] else ""
        )
        state = f"[{STYLE[j['state']]}]{j['state']}[/]" if j["state"] in STYLE else j["state"]
        t.add_row(j["room"], j["version"], j["instance"][-12:], state, latency, j["error"][:40])
    return t


def _dispatch(url: str, room: str, metadata: str = "{}") -> str:
    """CreateDispatch for the agent in `room`, as LiveKit's client sends it; the job's id."""
    token = tokens.mint(DEV_KEY, DEV_SECRET, video={"roomAdmin": True, "room": room})
    r = httpx.post(
        f"{url}/twirp/livekit.AgentDispatchService/CreateDispatch",
        json={"agent_name": AGENT_NAME, "room": room, "metadata": metadata},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    r.raise_for_status()
    return str(r.json()["state"]["jobs"][0]["id"])


def _jobs(url: str) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = httpx.get(
        f"{url}/api/v1/jobs", params={"limit": 200}, headers=_admin(), timeout=30
    ).json()
    return jobs


def _vf(folder: Path, url: str, run: Callable[..., Any] = subprocess.run) -> Callable[..., None]:
    """`vf agent …` in `folder` against `url`, shown as typed; `run` starts it (inside a
    namespace: its `run`)."""
    env = {**os.environ, "VF_URL": url, "VF_API_KEY": DEV_KEY, "VF_API_SECRET": DEV_SECRET}
    env["VOICEFLEET_API_KEY"] = ""  # a key of the user's own would beat the dev key

    def vf(*args: str) -> None:
        console.print(f"[bold]$ vf agent {' '.join(args)}[/bold]")
        done = run([sys.executable, "-m", "voicefleet", "agent", *args], cwd=folder, env=env)
        if done.returncode != 0:
            raise DemoError(
                f"vf agent {' '.join(args)} failed ({done.returncode}); logs in {folder.parent}"
            )

    return vf


@contextlib.contextmanager
def _server(data_dir: Path) -> Iterator[str]:
    """`vf server --dev` on a free port, its data in `data_dir`; its url. Stopped on exit."""
    data_dir.mkdir(parents=True)
    ready = data_dir / "ready.json"
    log_path = data_dir / "server.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "voicefleet", "server", "--dev", "--port", "0",
             "--data-dir", str(data_dir), "--ready-file", str(ready), "--no-keep-instances"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            if server.poll() is not None or time.monotonic() > deadline:
                raise DemoError(f"the server did not start; see {log_path}")
            time.sleep(0.1)
        yield str(json.loads(ready.read_text())["url"])
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)


def run_demo(agent: Path, replicas: int, sessions: int, seconds: float) -> None:
    if not (agent / "agent.py").exists():
        raise DemoError(f"no agent.py in {agent}: --agent takes a Python agent's folder")
    work = Path(tempfile.mkdtemp(prefix="voicefleet-demo-"))
    folder = work / "voice-agent"
    shutil.copytree(agent, folder, ignore=shutil.ignore_patterns("livekit.toml", "Dockerfile"))
    checkout = agent.resolve().parent.parent
    binary, why_not = _real_livekit(checkout)
    if binary is None:
        if why_not:
            console.print(f"[yellow]no real calls:[/yellow] {why_not}")
        _synthetic_sessions(work, folder, replicas, sessions, seconds)
    else:  # real calls weigh more than synthetic sessions: a few at once on a small machine
        _real_calls(checkout, work, folder, binary, replicas, min(sessions, 3))


def _real_livekit(checkout: Path) -> tuple[Path | None, str]:
    """The built livekit-server (as tests/livekit.py finds it) if real calls can run here;
    else None and why not ("" when there is no binary: the usual demo, nothing to say)."""
    peers = checkout / "scripts" / "peers"
    if not (peers.exists() and (checkout / "tests" / "livekit.py").exists()):
        return None, ""
    found = subprocess.run([str(peers), "path", "livekit-server"], capture_output=True, text=True)
    if found.returncode != 0:
        return None, ""
    binary = found.stdout.strip()
    missing = [tool for tool in ("unshare", "nsenter", "ip") if shutil.which(tool) is None]
    if missing:
        why = f"{', '.join(missing)} not found (util-linux, iproute2)"
    else:
        tried = subprocess.run(
            ["unshare", "--net", "ip", "link", "set", "lo", "up"], capture_output=True, text=True
        )
        why = f"`unshare --net` failed: {tried.stderr.strip() or tried.returncode}"
        if tried.returncode == 0:
            return Path(binary), ""
    return None, (
        f"livekit-server is built ({binary}), but real calls run in a network namespace of "
        f"their own, which needs root (CAP_SYS_ADMIN), and {why}. Synthetic sessions instead."
    )


# -- without a LiveKit server: synthetic sessions -------------------------------------------


def _synthetic_sessions(
    work: Path, folder: Path, replicas: int, sessions: int, seconds: float
) -> None:
    data = work / "data"
    console.rule("[bold]1. vf server --dev")
    with _server(data) as url:
        console.print(f"listening on {url} (data and logs in {work})")
        vf = _vf(folder, url)
        console.rule("[bold]2. create and deploy the example agent")
        vf("create", "--name", AGENT_NAME)
        vf("scale", str(replicas))
        vf("deploy")

        def dispatch(room: str) -> str:
            return _dispatch(url, room, json.dumps({"seconds": seconds}))

        console.rule(f"[bold]3. {sessions} sessions of {seconds:g}s, then v2 deployed during them")
        ids = [dispatch(f"call-{i + 1}") for i in range(sessions)]
        (folder / "GREETING.txt").write_text("v2 says hello\n")
        vf("deploy")
        ids += [dispatch(f"after-deploy-{i + 1}") for i in range(2)]

        def ours() -> list[dict[str, Any]]:
            return [j for j in _jobs(url) if j["id"] in ids]

        with Live(_table(ours()), console=console, refresh_per_second=4) as live:
            deadline = time.monotonic() + seconds + 120
            while time.monotonic() < deadline:
                jobs = ours()
                live.update(_table(jobs))
                if len(jobs) == len(ids) and all(j["state"] in ENDED for j in jobs):
                    break
                time.sleep(0.25)
        if not console.is_terminal:
            console.line()  # Live leaves the last table without a newline when piped
        jobs = ours()
        done = sum(j["state"] == "succeeded" for j in jobs)
        console.rule("[bold]4. what happened")
        vf("status")
        console.print(
            f"{done}/{len(ids)} sessions succeeded; the first {sessions} started on v1 and "
            "finished there while v2 rolled out; later ones ran on v2."
        )
        if done != len(ids):
            raise DemoError(f"{len(ids) - done} session(s) did not succeed; see {data}")


# -- with a LiveKit server: real calls in a network namespace --------------------------------


def _real_calls(
    checkout: Path, work: Path, folder: Path, binary: Path, replicas: int, calls: int
) -> None:
    sys.path.insert(0, str(checkout))  # the test rig of the checkout (tests/livekit.py)
    from tests.livekit import NsVoicefleet, livekit_server

    # Inside the namespace nothing reaches PyPI: a server outside builds the agent's
    # environment first, into the cache both servers share.
    os.environ["VF_ENV_CACHE"] = str(work / "envs")
    console.rule("[bold]1. build the example agent (outside the namespace, where PyPI is)")
    with _server(work / "build") as url:
        build = _vf(folder, url)
        build("create", "--name", AGENT_NAME)
        build("deploy")
    (folder / "livekit.toml").unlink()  # its id belongs to that server

    console.rule("[bold]2. livekit-server and vf server --dev in a network namespace")
    with livekit_server(work / "livekit", binary=binary) as lk:
        server = NsVoicefleet(lk, work / "data", log_level="warning")
        try:
            server.started()
            console.print(
                f"livekit-server {lk.url} and vf server {server.url} in namespace {lk.ns.name} "
                f"(data and logs in {work})"
            )
            vf = _vf(folder, server.url, lk.ns.run)
            vf("create", "--name", AGENT_NAME)
            vf("scale", str(replicas))
            vf("deploy")

            def call(room: str, utterances: int) -> _Call:
                started = _Call(lk, checkout, work, room, utterances)
                lk.ns.call_sync(lambda: _dispatch(server.url, room))
                return started

            console.rule(f"[bold]3. {calls} real calls, then v2 deployed while they speak")
            ongoing = [call(f"call-{i + 1}", 8) for i in range(calls)]
            with console.status("the callers join and the agent greets them"):
                _wait(lambda: all(c.said() for c in ongoing), 120, "the callers' first words")
            (folder / "GREETING.txt").write_text("v2 says hello\n")
            vf("deploy")
            ongoing.append(call("after-deploy", 3))
            with console.status("the calls go on to their end"):
                _wait(lambda: all(c.ended() for c in ongoing), 240, "the calls to end")
            jobs = lk.ns.call_sync(lambda: _jobs(server.url))

            console.rule("[bold]4. what happened")
            vf("status")
            console.print(_table([j for j in jobs if j["room"] in {c.room for c in ongoing}]))
            console.print(_figures(ongoing, jobs))
            answered = sum(c.report()["answered"] for c in ongoing)
            console.print(
                f"{answered}/{len(ongoing)} calls had every utterance answered; the first "
                f"{calls} started on v1 and stayed there while v2 rolled out; the last ran on v2."
            )
            if answered != len(ongoing):
                raise DemoError(f"{len(ongoing) - answered} call(s) went unanswered; see {work}")
        finally:
            server.stop()


class _Call:
    """The caller simulator in `room`, inside the namespace; its output in the work folder."""

    def __init__(self, lk: Any, checkout: Path, work: Path, room: str, utterances: int) -> None:
        self.room = room
        self.log = work / f"caller-{room}.log"
        self.report_path = work / f"caller-{room}.json"
        with open(self.log, "wb") as out:
            self.proc = lk.ns.popen(
                [sys.executable, "-m", "tests.caller", "--room", room,
                 "--report", str(self.report_path), "--utterances", str(utterances)],
                env={**os.environ, **lk.env()}, cwd=checkout,
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def said(self) -> bool:
        if self.proc.poll() is not None:
            raise DemoError(f"the caller in {self.room} exited; see {self.log}")
        return '{"event": "said"' in self.log.read_text(errors="replace")

    def ended(self) -> bool:
        return self.proc.poll() is not None

    def report(self) -> dict[str, Any]:
        if not self.report_path.exists():
            raise DemoError(f"the caller in {self.room} wrote no report; see {self.log}")
        found: dict[str, Any] = json.loads(self.report_path.read_text())
        return found


def _wait(done: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.2)


def _figures(calls: list[_Call], jobs: list[dict[str, Any]]) -> Table:
    """Per call, as its caller measured it."""
    t = Table(title="calls, as the callers heard them")
    for col in ("room", "version", "join", "join → greeting", "answered", "reply p50 / max"):
        t.add_column(col)
    t.add_column("gaps in the agent's audio")
    version = {j["room"]: j["version"] for j in jobs}
    for c in calls:
        r = c.report()
        replies = [u["reply_ms"] for u in r["utterances"] if u["reply_ms"] is not None]
        answered = f"{len(replies)}/{len(r['utterances'])}"
        greeting = r["join_to_first_audio_ms"]
        t.add_row(
            c.room,
            version.get(c.room, ""),
            f"{r['join_ms']:.0f} ms",
            f"{greeting:.0f} ms" if greeting is not None else "[red]none[/]",
            answered if r["answered"] else f"[red]{answered}[/]",
            f"{statistics.median(replies):.0f} / {max(replies):.0f} ms" if replies else "",
            ", ".join(f"{g['ms']:.0f} ms at {g['at_s']:.1f} s" for g in r["gaps"]) or "none",
        )
    return t
