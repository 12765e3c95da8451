"""`vf demo`: the embedded server deploys the example agent and serves sessions, shown live.

Everything a user would do by hand, in order: `vf server`, `vf agent create`, `vf agent
deploy`, sessions through LiveKit's dispatch API, then a second deploy while those sessions
are in flight, to show that none of them is cut.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
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


def run_demo(agent: Path, replicas: int, sessions: int, seconds: float) -> None:
    if not (agent / "agent.py").exists():
        raise DemoError(f"no agent.py in {agent} (run from the voicefleet checkout)")
    work = Path(tempfile.mkdtemp(prefix="voicefleet-demo-"))
    folder = work / "voice-agent"
    shutil.copytree(agent, folder, ignore=shutil.ignore_patterns("livekit.toml", "Dockerfile"))
    ready = work / "ready.json"
    log_path = work / "server.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "voicefleet", "server", "--dev", "--port", "0",
             "--data-dir", str(work / "data"), "--ready-file", str(ready), "--no-keep-instances"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        console.rule("[bold]1. vf server --dev")
        deadline = time.monotonic() + 60
        while not ready.exists():
            if server.poll() is not None or time.monotonic() > deadline:
                raise DemoError(f"the server did not start; see {log_path}")
            time.sleep(0.1)
        url = json.loads(ready.read_text())["url"]
        console.print(f"listening on {url} (data and logs in {work})")
        env = {**os.environ, "VF_URL": url, "VF_API_KEY": DEV_KEY, "VF_API_SECRET": DEV_SECRET}

        def vf(*args: str) -> None:
            console.print(f"[bold]$ vf agent {' '.join(args)}[/bold]")
            code = subprocess.call(
                [sys.executable, "-m", "voicefleet", "agent", *args], cwd=folder, env=env
            )
            if code != 0:
                raise DemoError(
                    f"vf agent {' '.join(args)} failed ({code}); server log: {log_path}"
                )

        console.rule("[bold]2. create and deploy the example agent")
        vf("create", "--name", "voice-agent")
        vf("scale", str(replicas))
        vf("deploy")

        client = httpx.Client(base_url=url, headers=_admin(), timeout=30)

        def dispatch(room: str) -> str:
            token = tokens.mint(DEV_KEY, DEV_SECRET, video={"roomAdmin": True, "room": room})
            r = client.post(
                "/twirp/livekit.AgentDispatchService/CreateDispatch",
                json={
                    "agent_name": "voice-agent",
                    "room": room,
                    "metadata": json.dumps({"seconds": seconds}),
                },
                headers={"Authorization": f"Bearer {token}"},
            )
            r.raise_for_status()
            return str(r.json()["state"]["jobs"][0]["id"])

        console.rule(f"[bold]3. {sessions} sessions of {seconds:g}s, then v2 deployed during them")
        ids = [dispatch(f"call-{i + 1}") for i in range(sessions)]
        (folder / "GREETING.txt").write_text("v2 says hello\n")
        vf("deploy")
        ids += [dispatch(f"after-deploy-{i + 1}") for i in range(2)]

        def ours() -> list[dict[str, Any]]:
            jobs: list[dict[str, Any]] = client.get("/api/v1/jobs", params={"limit": 200}).json()
            return [j for j in jobs if j["id"] in ids]

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
            raise DemoError(f"{len(ids) - done} session(s) did not succeed; see {log_path}")
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
