"""Deploy benchmark: how fast new sessions move to a new version, and whether any is dropped.

    python benchmarks/deploy/run.py [--replicas 2 --session-seconds 3 --interval 0.1]

Starts `vf server`, deploys examples/voice_agent (v1), then keeps a steady stream of sessions
going (one every --interval seconds, each --session-seconds long) while it:
  1. deploys v2 (a source change, same dependencies: the build reuses the environment)
  2. rolls back to v1 (the stored build: no rebuild)
and reports, from the server's own records (job created_at / assigned version, worker
registered_at, version created_at / built_at):
  rebuild      upload -> version built, unchanged dependencies            (target <= 3 s)
  shift        first v2 worker registered -> new sessions routed to v2    (target <= 1 s)
               (sessions queued meanwhile go to v2 at that moment, so "every later session on
               v2" can start before the first v2 worker registered: a negative figure)
  deploy       deploy command -> every later session on v2
  rollback     rollback command -> first session on v1                    (target <= 3 s)
  dropped      sessions that failed                                        (must be 0)
"""

from __future__ import annotations

import argparse
import asyncio
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

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
from voicefleet.protocol import tokens  # noqa: E402

KEY, SECRET = "devkey", "secret"


class Bench:
    def __init__(self, url: str, folder: Path) -> None:
        self.url, self.folder = url, folder
        admin = tokens.mint_admin(KEY, SECRET)
        self.http = httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=30
        )
        self.env = {**os.environ, "VF_URL": url, "VF_API_KEY": KEY, "VF_API_SECRET": SECRET}
        self.jobs: list[str] = []

    async def vf(self, *args: str) -> float:
        """Run `vf agent …` in the agent folder; return when it started (epoch seconds)."""
        began = time.time()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "voicefleet", "agent", *args, cwd=self.folder, env=self.env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"vf agent {' '.join(args)} failed: {err.decode()}")
        return began

    async def sessions(self, interval: float, seconds: float, stop: asyncio.Event) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            room = f"bench-{n}"
            token = tokens.mint(KEY, SECRET, video={"roomAdmin": True, "room": room})
            r = await self.http.post(
                "/twirp/livekit.AgentDispatchService/CreateDispatch",
                json={"agent_name": "voice-agent", "room": room, "metadata": json.dumps({"seconds": seconds})},
                headers={"Authorization": f"Bearer {token}"},
            )  # fmt: skip
            r.raise_for_status()
            self.jobs.append(r.json()["state"]["jobs"][0]["id"])
            await asyncio.sleep(interval)

    async def records(self) -> list[dict[str, Any]]:
        jobs: list[dict[str, Any]] = (
            await self.http.get("/api/v1/jobs", params={"limit": 10000})
        ).json()
        ours = set(self.jobs)
        return sorted((j for j in jobs if j["id"] in ours), key=lambda j: j["created_at"])

    async def versions(self) -> dict[str, dict[str, Any]]:
        found = (await self.http.get("/api/v1/agents/voice-agent/versions")).json()
        return {v["version"]: v for v in found}


def all_on_from(
    jobs: list[dict[str, Any]], version: str, after: float, before: float
) -> float | None:
    """Creation time of the first job in [after, before) from which every later one there
    ran `version`."""
    later = [j for j in jobs if after <= j["created_at"] < before]
    t = None
    for j in later:
        if j["version"] != version:
            t = None
        elif t is None:
            t = j["created_at"]
    return t


async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="vf-deploy-bench-"))
    folder = work / "voice-agent"
    shutil.copytree(ROOT / "examples" / "voice_agent", folder)
    ready = work / "ready.json"
    server = subprocess.Popen(
        [sys.executable, "-m", "voicefleet", "server", "--dev", "--port", "0", "--data-dir",
         str(work / "data"), "--ready-file", str(ready), "--no-keep-instances", "--log-level", args.log_level],
        stdout=open(work / "server.log", "wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        while not ready.exists():
            if server.poll() is not None:
                raise SystemExit((work / "server.log").read_text())
            await asyncio.sleep(0.05)
        bench = Bench(json.loads(ready.read_text())["url"], folder)
        await bench.vf("create", "--name", "voice-agent")
        await bench.vf("scale", str(args.replicas))
        await bench.vf("deploy")

        stop = asyncio.Event()
        stream = asyncio.create_task(bench.sessions(args.interval, args.session_seconds, stop))
        await asyncio.sleep(2)
        (folder / "CHANGE.txt").write_text("v2\n")
        deploy_started = await bench.vf("deploy")
        workers = (await bench.http.get("/api/v1/workers")).json()
        v2_registered = min(w["registered_at"] for w in workers if w["pool"] == "v2")
        await asyncio.sleep(2)
        rollback_started = await bench.vf("rollback")
        await asyncio.sleep(2)
        stop.set()
        await stream

        deadline = time.time() + args.session_seconds + 60
        while True:
            jobs = await bench.records()
            if all(j["state"] in ("succeeded", "failed", "terminated") for j in jobs):
                break
            if time.time() > deadline:
                raise SystemExit("sessions did not end")
            await asyncio.sleep(0.5)
        versions = await bench.versions()
        v2_all = all_on_from(jobs, "v2", deploy_started, rollback_started)
        (work / "jobs.json").write_text(json.dumps(jobs))
        print(
            f"deploy {deploy_started:.3f} rollback {rollback_started:.3f} v2 worker {v2_registered:.3f}"
        )
        v1_back = next(
            (
                j["created_at"]
                for j in jobs
                if j["created_at"] >= rollback_started and j["version"] == "v1"
            ),
            None,
        )
        events = (await bench.http.get("/api/v1/agents/voice-agent/events")).json()
        shifted = [e["at"] for e in events if e["kind"] == "rollout_shifted"]
        v2_shift = min((t for t in shifted if deploy_started <= t < rollback_started), default=None)
        v2 = versions["v2"]
        for j in jobs:
            if j["state"] != "succeeded":
                print(f"not succeeded: {j['room']} {j['version']} {j['state']}: {j['error']}")
        return {
            "replicas": args.replicas,
            "sessions": len(jobs),
            "dropped": sum(j["state"] != "succeeded" for j in jobs),
            "rebuild_s": v2["built_at"] - v2["created_at"],
            "shift_after_first_v2_worker_s": (v2_shift - v2_registered) if v2_shift else None,
            "all_new_on_v2_after_first_v2_worker_s": (v2_all - v2_registered) if v2_all else None,
            "deploy_command_to_all_new_on_v2_s": (v2_all - deploy_started) if v2_all else None,
            "rollback_command_to_first_v1_session_s": (v1_back - rollback_started)
            if v1_back
            else None,
            "session_interval_s": args.interval,
        }
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--session-seconds", type=float, default=3)
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the server's data and logs")
    parser.add_argument("--log-level", default="warning", help="the server's log level")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    for key, value in result.items():
        print(f"{key:42} {value if not isinstance(value, float) else round(value, 3)}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
