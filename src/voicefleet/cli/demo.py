"""`vf demo`: the embedded server, the example agent's workers and a few sessions, shown live."""

from __future__ import annotations

import json
import os
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
STATE_STYLE = {"succeeded": "green", "failed": "red", "terminated": "yellow", "running": "cyan"}


class DemoError(Exception):
    pass


def _wait(what: str, check: Any, timeout: float, procs: list[subprocess.Popen[bytes]]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise DemoError(f"a process exited ({proc.returncode}) {what}: {proc.args!r}")
        result = check()
        if result:
            return result
        time.sleep(0.2)
    raise DemoError(f"timed out after {timeout:g}s {what}")


def run_demo(agent: Path, workers: int, sessions: int, seconds: float) -> None:
    if not agent.exists():
        raise DemoError(f"no agent at {agent} (run from the voicefleet checkout)")
    work = Path(tempfile.mkdtemp(prefix="voicefleet-demo-"))
    ready = work / "ready.json"
    logs = work / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        with open(logs / f"{name}.log", "wb") as log:
            procs.append(
                subprocess.Popen(
                    args,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **(env or {})},
                    start_new_session=True,
                )
            )

    try:
        console.print(f"[bold]1.[/bold] Starting [bold]vf server --dev[/bold] (data in {work})")
        spawn(
            "server",
            [sys.executable, "-m", "voicefleet", "server", "--dev", "--port", "0",
             "--data-dir", str(work / "data"), "--ready-file", str(ready)],
        )  # fmt: skip
        _wait("starting the server", ready.exists, 60, procs)
        url = json.loads(ready.read_text())["url"]
        console.print(f"   listening on {url}")

        console.print(
            f"[bold]2.[/bold] Starting {workers} unmodified LiveKit worker(s): "
            f"python {agent} start, LIVEKIT_URL={url.replace('http', 'ws')}"
        )
        env = {
            "LIVEKIT_URL": url.replace("http", "ws"),
            "LIVEKIT_API_KEY": DEV_KEY,
            "LIVEKIT_API_SECRET": DEV_SECRET,
            "LIVEKIT_AGENT_NAME": "hello",
        }
        for i in range(workers):
            spawn(f"worker{i}", [sys.executable, str(agent), "start"], env)
        admin = {
            "Authorization": f"Bearer {tokens.mint(DEV_KEY, DEV_SECRET, video={'roomAdmin': True})}"
        }
        client = httpx.Client(base_url=url, headers=admin, timeout=10)
        _wait(
            "waiting for the workers to register",
            lambda: len(client.get("/api/v1/workers").json()) >= workers,
            120,
            procs,
        )
        for w in client.get("/api/v1/workers").json():
            console.print(f"   worker {w['id']} registered (livekit-agents {w['sdk_version']})")

        console.print(
            f"[bold]3.[/bold] Dispatching {sessions} sessions of {seconds:g}s through "
            "AgentDispatchService/CreateDispatch"
        )
        job_ids = []
        for i in range(sessions):
            room = f"demo-room-{i + 1}"
            token = tokens.mint(DEV_KEY, DEV_SECRET, video={"roomAdmin": True, "room": room})
            r = client.post(
                "/twirp/livekit.AgentDispatchService/CreateDispatch",
                json={
                    "agent_name": "hello",
                    "room": room,
                    "metadata": json.dumps({"seconds": seconds}),
                },
                headers={"Authorization": f"Bearer {token}"},
            )
            r.raise_for_status()
            job_ids.append(r.json()["state"]["jobs"][0]["id"])

        def table(jobs: list[dict[str, Any]]) -> Table:
            t = Table(title="sessions")
            for col in ("job", "room", "worker", "state", "dispatch → assigned", "detail"):
                t.add_column(col)
            for j in sorted(jobs, key=lambda j: j["room"]):
                latency = (
                    f"{(j['assigned_at'] - j['created_at']) * 1000:.1f} ms"
                    if j["assigned_at"]
                    else ""
                )
                style = STATE_STYLE.get(j["state"], "")
                t.add_row(
                    j["id"],
                    j["room"],
                    j["worker_id"],
                    f"[{style}]{j['state']}[/]" if style else j["state"],
                    latency,
                    j["error"],
                )
            return t

        def ours() -> list[dict[str, Any]]:
            return [j for j in client.get("/api/v1/jobs").json() if j["id"] in job_ids]

        ended = {"succeeded", "failed", "terminated"}
        deadline = time.monotonic() + seconds + 60
        with Live(table(ours()), console=console, refresh_per_second=4) as live:
            while time.monotonic() < deadline:
                jobs = ours()
                live.update(table(jobs))
                if len(jobs) == len(job_ids) and all(j["state"] in ended for j in jobs):
                    break
                time.sleep(0.25)
        jobs = ours()
        done = sum(j["state"] == "succeeded" for j in jobs)
        per_worker: dict[str, int] = {}
        for j in jobs:
            per_worker[j["worker_id"]] = per_worker.get(j["worker_id"], 0) + 1
        console.print(
            f"[bold]4.[/bold] {done}/{sessions} sessions succeeded; sessions per worker "
            f"(round robin): {per_worker}"
        )
        metrics = client.get("/metrics").text
        p50 = [
            line
            for line in metrics.splitlines()
            if line.startswith("voicefleet_dispatch_latency_seconds_count")
        ]
        console.print(f"   /metrics: {p50[0] if p50 else 'no dispatch latency yet'}")
        console.print(f"   logs: {logs}")
        if done != sessions:
            raise DemoError(f"{sessions - done} session(s) did not succeed; see {logs}")
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
