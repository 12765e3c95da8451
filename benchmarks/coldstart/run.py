"""Cold start: a dispatch for an agent scaled to zero, until its entrypoint runs, against the
start of a bare worker (`python agent.py start`, no voicefleet in between) in the same run.

    python benchmarks/coldstart/run.py [--rounds 5] [--agent examples/voice_agent]
    python benchmarks/coldstart/run.py --lang node [--agent examples/node_agent]

Both are measured the same way, on the server's clock: a dispatch is created and waits; then
  cold  the autoscaler sees the queued session, starts an instance (launcher, health port, its
        own API key), the worker registers and takes the job: dispatch -> job running
  bare  the same built environment runs `python agent.py start` by hand, signing with the
        project key: process spawn -> job running
The job is `running` when the worker reports that the entrypoint started. Rounds alternate, so
both see the same machine. Also printed: the queue wait p99 of a spike of sessions beyond the
agent's max instances (they queue and are served as sessions end; none is dropped).

With --lang node, a Node.js agent: examples/node_agent's package (@livekit/agents 1.9.0, its
lockfile) with benchmarks/coldstart/node_agent.js as agent.js (sessions end after their
{"seconds": N}). The bare worker is `node agent.js start` in the built version's folder (its
node_modules), HEALTH_PORT set. @livekit/agents reports no job status by itself, so both are
measured to the job's assignment (the worker registered and accepted the session; its job
process runs the entrypoint next, the same way in both); the cold start's `running` (reported
through voicefleet's preload) is printed beside it. Also printed for Node: the build of the
first version (npm ci; npm's own download cache as the machine has it) and of a second one whose
only change is in the sources (node_modules reused), from the server's records.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
from voicefleet.protocol import tokens  # noqa: E402

KEY, SECRET = "devkey", "secret"


class Bench:
    def __init__(self, data: Path) -> None:
        data.mkdir(parents=True, exist_ok=True)
        ready = data / "ready.json"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "voicefleet", "server", "--dev", "--port", "0",
             "--data-dir", str(data), "--ready-file", str(ready), "--log-level", "warning"],
            stdout=open(data / "server.log", "wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start: {(data / 'server.log').read_text()}")
            time.sleep(0.05)
        self.url = json.loads(ready.read_text())["url"]
        self.data = data
        token = tokens.mint_admin(KEY, SECRET)
        self.http = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
        )

    def vf(self, folder: Path, *args: str) -> None:
        env = {**os.environ, "VF_URL": self.url, "VF_API_KEY": KEY, "VF_API_SECRET": SECRET}
        subprocess.run(
            [sys.executable, "-m", "voicefleet", "agent", *args],
            cwd=folder, env=env, check=True, capture_output=True, timeout=600,
        )  # fmt: skip

    def dispatch(self, agent: str, room: str, metadata: str = "") -> tuple[str, float]:
        body = {"agent_name": agent, "room": room, "metadata": metadata}
        token = tokens.mint(KEY, SECRET, video={"roomAdmin": True, "room": room})
        r = self.http.post(
            "/twirp/livekit.AgentDispatchService/CreateDispatch",
            json=body,
            headers={"Authorization": f"Bearer {token}"},
        )
        r.raise_for_status()
        return r.json()["state"]["jobs"][0]["id"], time.time()

    def job(self, job_id: str) -> dict[str, Any] | None:
        found = self.http.get("/api/v1/jobs", params={"limit": 200}).json()
        return next((j for j in found if j["id"] == job_id), None)

    def wait_job(self, job_id: str, states: tuple[str, ...], timeout: float = 120) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job and job["state"] in states:
                return job
            time.sleep(0.05)
        raise SystemExit(f"job {job_id} not {states} after {timeout}s")

    def live_instances(self, agent: str) -> int:
        status = self.http.get(f"/api/v1/agents/{agent}").json()
        return sum(1 for i in status["instances"] if i["status"] in ("starting", "ready"))

    def wait_zero(self, agent: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.live_instances(agent) and time.monotonic() < deadline:
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--lang", choices=("python", "node"), default="python")
    parser.add_argument(
        "--agent", type=Path, help="default: examples/voice_agent (node: examples/node_agent)"
    )
    parser.add_argument("--spike", type=int, default=30, help="sessions in the spike")
    args = parser.parse_args()
    node = args.lang == "node"
    if args.agent is None:
        args.agent = ROOT / "examples" / ("node_agent" if node else "voice_agent")
    # Python: to the entrypoint running. Node.js: to the assignment (see the docstring).
    mark = "assigned_at" if node else "started_at"
    cold_running: list[float] = []
    builds: list[float] = []

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "cold"
        subprocess.run(["cp", "-r", str(args.agent), str(folder)], check=True)
        (folder / "livekit.toml").unlink(missing_ok=True)
        if node:
            shutil.rmtree(folder / "node_modules", ignore_errors=True)
            shutil.copy(Path(__file__).with_name("node_agent.js"), folder / "agent.js")
        bench = Bench(Path(tmp) / "data")
        try:
            bench.vf(folder, "create", "--name", "cold")
            bench.vf(folder, "secrets", "set", "MAX_SESSIONS=4")
            bench.vf(folder, "deploy")
            if node:  # a change of sources only: the second build reuses node_modules
                with open(folder / "agent.js", "a") as f:
                    f.write("// v2\n")
                bench.vf(folder, "deploy")
                versions = bench.http.get("/api/v1/agents/cold/versions").json()
                builds = [
                    v["built_at"] - v["created_at"]
                    for v in sorted(versions, key=lambda v: v["created_at"])
                ]
            bench.vf(folder, "scale", "--min", "0", "--max", "3", "--idle-to-zero", "1s",
                     "--up-window", "2s", "--down-window", "10s")  # fmt: skip
            if node:  # the newest version's sources, node_modules linked in
                bare_argv = ["node", "agent.js", "start"]
                bare_dir = max(
                    bench.data.rglob("src/node_modules"), key=lambda p: p.stat().st_mtime
                )
                bare_dir = bare_dir.parent
            else:
                env_dir = next(p for p in (bench.data / "envs").iterdir() if p.is_dir())
                bare_argv, bare_dir = [str(env_dir / "bin" / "python"), "agent.py", "start"], folder
            cold, bare = [], []
            for i in range(args.rounds):
                bench.wait_zero("cold")
                job_id, _ = bench.dispatch("cold", f"cold-{i}", json.dumps({"seconds": 0.2}))
                job = bench.wait_job(job_id, ("running", "succeeded"))
                cold.append(job[mark] - job["created_at"])
                cold_running.append(job["started_at"] - job["created_at"])

                job_id, _ = bench.dispatch("cold-bare", f"bare-{i}", json.dumps({"seconds": 0.2}))
                spawned = time.time()
                worker = subprocess.Popen(
                    bare_argv,
                    cwd=bare_dir,
                    env={
                        "PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"),
                        "LIVEKIT_URL": bench.url.replace("http", "ws", 1),
                        "LIVEKIT_API_KEY": KEY, "LIVEKIT_API_SECRET": SECRET,
                        "LIVEKIT_AGENT_NAME_OVERRIDE": "cold-bare",
                        "LIVEKIT_AGENT_NAME": "cold-bare",  # @livekit/agents reads this one
                        "HEALTH_PORT": str(free_port()),
                    },
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                )  # fmt: skip
                try:
                    wanted = (
                        ("assigned", "running", "succeeded") if node else ("running", "succeeded")
                    )
                    job = bench.wait_job(job_id, wanted)
                    bare.append(job[mark] - spawned)
                finally:
                    os.killpg(worker.pid, signal.SIGKILL)
                    worker.wait()
                print(f"round {i + 1}: cold start {cold[-1]:.2f} s, bare worker {bare[-1]:.2f} s")

            # A spike beyond max instances (3 x 3 sessions before FULL): sessions queue.
            bench.wait_zero("cold")
            made = [
                bench.dispatch("cold", f"spike-{i}", json.dumps({"seconds": 5}))
                for i in range(args.spike)
            ]
            waits, states = [], []
            for job_id, _ in made:
                job = bench.wait_job(job_id, ("succeeded", "failed", "terminated"), 300)
                states.append(job["state"])
                waits.append(job["assigned_at"] - job["created_at"])
        finally:
            bench.stop()
    med_cold, med_bare = statistics.median(cold), statistics.median(bare)
    waits.sort()
    p99 = waits[min(len(waits) - 1, int(0.99 * len(waits)))]
    until = "session assigned" if node else "entrypoint running"
    if node:
        print(
            f"build v1 (npm ci): {builds[0]:.2f} s; build v2 (sources changed, node_modules "
            f"reused): {builds[1]:.2f} s\n"
            f"cold start, dispatch -> job running (voicefleet's report), median: "
            f"{statistics.median(cold_running):.2f} s"
        )
    print(
        f"cold start (dispatch -> {until}), median of {args.rounds}: {med_cold:.2f} s "
        f"({min(cold):.2f}-{max(cold):.2f})\n"
        f"bare worker start (spawn -> {until}), median: {med_bare:.2f} s "
        f"({min(bare):.2f}-{max(bare):.2f})\n"
        f"ratio: {med_cold / med_bare:.2f}x (target <= 1.5x)\n"
        f"spike of {args.spike} sessions, max 3 instances from zero: queue wait p50 "
        f"{statistics.median(waits):.2f} s, p99 {p99:.2f} s; "
        f"{states.count('succeeded')} succeeded, {len(states) - states.count('succeeded')} not"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


if __name__ == "__main__":
    main()
