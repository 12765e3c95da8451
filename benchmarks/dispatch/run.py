"""Dispatch benchmark: simulated protocol workers and a dispatch load against `vf server`.

    python benchmarks/dispatch/run.py                 # the full run (figures in BENCHMARKS.md)
    python benchmarks/dispatch/run.py --quick         # a one-minute smoke run

The server runs as its own process; the workers (light aiohttp WebSocket clients speaking the
worker protocol, many in this one process) and the dispatcher (Twirp CreateDispatch over
keep-alive HTTP, protobuf) run here, so both clocks are this process's. Phases:

  reference   loopback WebSocket round trip: an aiohttp echo server in another process, and
              protocol ping/pong through voicefleet itself
  latency     open-loop CreateDispatch at --rate for --duration over --workers workers;
              latency = CreateDispatch sent -> assignment received by the worker
  throughput  closed-loop, --concurrency dispatches in flight: assignments per second
  memory      --memory-workers workers hold --memory-jobs live jobs; server RSS
  routing     --pairs alternating pairs: latency and throughput with one version, then with a
              two-version routing table (workers signing with version keys v1/v2, new sessions
              split 90/10 by hash of the dispatch), each on a fresh server; the ratios of each
              pair and their medians (pairs cancel the machine's drift between runs)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from livekit.protocol import agent, agent_dispatch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
from voicefleet.protocol import tokens

KEY, SECRET = "devkey", "secret"
AGENT = "bench"


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


@dataclass
class Fleet:
    """Simulated workers: accept every offer; end jobs at once unless `hold` is set."""

    url: str
    hold: bool = False
    versions: int = 1  # > 1: workers sign with version keys v1, v2, ... in turn
    assigned_at: dict[str, float] = field(default_factory=dict)  # room -> time received
    sockets: list[aiohttp.ClientWebSocketResponse] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    want: int = 0
    session: aiohttp.ClientSession | None = None

    async def start(self, _: aiohttp.ClientSession, n: int) -> None:
        # A session of its own, without a connection limit: every worker holds a connection.
        self.session = session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        for i in range(n):
            if self.versions > 1:
                identity = tokens.WorkerIdentity(AGENT, f"v{i % self.versions + 1}", f"w{i}")
                key, secret = tokens.instance_credentials(SECRET, identity)
            else:
                key, secret = KEY, SECRET
            token = tokens.mint(key, secret, video={"agent": True})
            ws = await session.ws_connect(
                f"{self.url}/agent", headers={"Authorization": f"Bearer {token}"}, max_msg_size=0
            )
            reg = agent.WorkerMessage(
                register=agent.RegisterWorkerRequest(type=agent.JobType.JT_ROOM, agent_name=AGENT)
            )
            await ws.send_bytes(reg.SerializeToString())
            await ws.receive_bytes()
            status = agent.UpdateWorkerStatus(status=agent.WorkerStatus.WS_AVAILABLE)
            await ws.send_bytes(agent.WorkerMessage(update_worker=status).SerializeToString())
            self.sockets.append(ws)
            self.tasks.append(asyncio.create_task(self._serve(ws)))
        self.tasks.append(asyncio.create_task(self._report_status()))

    async def _report_status(self) -> None:
        # As livekit-agents does every 2.5 s; the server drops workers that go silent.
        frame = agent.WorkerMessage(
            update_worker=agent.UpdateWorkerStatus(status=agent.WorkerStatus.WS_AVAILABLE)
        ).SerializeToString()
        while True:
            await asyncio.sleep(2.5)
            for ws in self.sockets:
                if not ws.closed:
                    await ws.send_bytes(frame)

    async def _serve(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for frame in ws:
            msg = agent.ServerMessage.FromString(frame.data)
            which = msg.WhichOneof("message")
            if which == "availability":
                job = msg.availability.job
                answer = agent.AvailabilityResponse(
                    job_id=job.id, available=True, participant_identity=f"agent-{job.id}"
                )
                await ws.send_bytes(agent.WorkerMessage(availability=answer).SerializeToString())
            elif which == "assignment":
                now = time.perf_counter()
                job = msg.assignment.job
                self.assigned_at[job.room.name] = now
                running = agent.UpdateJobStatus(job_id=job.id, status=agent.JobStatus.JS_RUNNING)
                await ws.send_bytes(agent.WorkerMessage(update_job=running).SerializeToString())
                if not self.hold:
                    done = agent.UpdateJobStatus(job_id=job.id, status=agent.JobStatus.JS_SUCCESS)
                    await ws.send_bytes(agent.WorkerMessage(update_job=done).SerializeToString())
                if self.want and len(self.assigned_at) >= self.want:
                    self.arrived.set()

    async def ping_rtt(self, session: aiohttp.ClientSession, count: int) -> list[float]:
        """Protocol ping -> pong through voicefleet, on a connection of its own (no jobs)."""
        token = tokens.mint(KEY, SECRET, video={"agent": True})
        ws = await session.ws_connect(
            f"{self.url}/agent", headers={"Authorization": f"Bearer {token}"}
        )
        reg = agent.RegisterWorkerRequest(type=agent.JobType.JT_ROOM, agent_name="bench-ping")
        await ws.send_bytes(agent.WorkerMessage(register=reg).SerializeToString())
        await ws.receive_bytes()
        rtts = []
        for _ in range(count):
            sent = time.perf_counter()
            ping = agent.WorkerMessage(ping=agent.WorkerPing(timestamp=int(time.time() * 1000)))
            await ws.send_bytes(ping.SerializeToString())
            agent.ServerMessage.FromString(await ws.receive_bytes())
            rtts.append(time.perf_counter() - sent)
        await ws.close()
        return rtts

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for ws in self.sockets:
            await ws.close()
        if self.session is not None:
            await self.session.close()


class Dispatcher:
    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session, self.url = session, url
        self.sent_at: dict[str, float] = {}
        self.errors = 0
        self._n = 0

    async def create(self) -> None:
        self._n += 1
        room = f"room-{self._n}"
        token = tokens.mint(KEY, SECRET, video={"roomAdmin": True, "room": room})
        body = agent_dispatch.CreateAgentDispatchRequest(agent_name=AGENT, room=room)
        self.sent_at[room] = time.perf_counter()
        async with self.session.post(
            f"{self.url}/twirp/livekit.AgentDispatchService/CreateDispatch",
            data=body.SerializeToString(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/protobuf"},
        ) as r:
            await r.read()
            if r.status != 200:
                self.errors += 1


def start_server(data: Path) -> tuple[subprocess.Popen[bytes], str]:
    ready = data / "ready.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "voicefleet", "server", "--dev", "--port", "0",
         "--data-dir", str(data), "--ready-file", str(ready), "--log-level", "warning",
         "--queue-limit", "100000"],
        stdout=open(data / "server.log", "wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"server did not start: {(data / 'server.log').read_text()}")
        time.sleep(0.05)
    return proc, json.loads(ready.read_text())["url"].replace("http://", "ws://")


ECHO_SERVER = """
import sys
from aiohttp import web
async def echo(request):
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        await ws.send_bytes(msg.data)
    return ws
app = web.Application(); app.router.add_get("/", echo)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
"""


async def echo_rtt(count: int) -> list[float]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, str(port)])
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                with contextlib.suppress(aiohttp.ClientError):
                    ws = await session.ws_connect(f"http://127.0.0.1:{port}/")
                    break
                await asyncio.sleep(0.1)
            payload, rtts = b"x" * 80, []
            for _ in range(count):
                sent = time.perf_counter()
                await ws.send_bytes(payload)
                await ws.receive_bytes()
                rtts.append(time.perf_counter() - sent)
            await ws.close()
            return rtts
    finally:
        proc.terminate()
        proc.wait()


async def wait_assigned(fleet: Fleet, n: int, timeout: float) -> None:
    fleet.want = n
    fleet.arrived.clear()
    if len(fleet.assigned_at) < n:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(fleet.arrived.wait(), timeout)


async def route_split(url: str, versions: int) -> None:
    """90 % of new sessions to v1, the rest shared by the other versions."""
    if versions < 2:
        return
    weights = {"v1": 90.0, **{f"v{i}": 10.0 / (versions - 1) for i in range(2, versions + 1)}}
    token = tokens.mint_admin(KEY, SECRET)
    async with aiohttp.ClientSession() as session:
        r = await session.put(
            f"{url.replace('ws://', 'http://')}/api/v1/routing/{AGENT}",
            json={"weights": weights},
            headers={"Authorization": f"Bearer {token}"},
        )
        if r.status != 200:
            raise SystemExit(f"could not set the routing table: {r.status} {await r.text()}")


async def latency_phase(
    url: str, workers: int, rate: float, duration: float, versions: int = 1
) -> dict[str, Any]:
    await route_split(url, versions)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:
        fleet = Fleet(url, versions=versions)
        await fleet.start(session, workers)
        ping = await fleet.ping_rtt(session, 500)
        gc.collect()
        gc.freeze()  # the load generator's own GC pauses would count as dispatch latency
        dispatcher = Dispatcher(session, url.replace("ws://", "http://"))
        total = int(rate * duration)
        began = time.perf_counter()
        pending: set[asyncio.Task[None]] = set()
        for i in range(total):
            # Open loop: request i goes out at its time whatever happened to the others.
            await asyncio.sleep(max(0.0, began + i / rate - time.perf_counter()))
            task = asyncio.create_task(dispatcher.create())
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*pending)
        await wait_assigned(fleet, total, 30)
        lat = [
            fleet.assigned_at[r] - s
            for r, s in dispatcher.sent_at.items()
            if r in fleet.assigned_at
        ]
        await fleet.close()
    return {
        "workers": workers, "rate": rate, "dispatched": total, "assigned": len(lat),
        "errors": dispatcher.errors, "p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3,
        "max_ms": max(lat) * 1e3 if lat else float("nan"),
        "ping_p50_ms": pct(ping, 50) * 1e3, "ping_p99_ms": pct(ping, 99) * 1e3,
    }  # fmt: skip


async def throughput_phase(
    url: str, workers: int, concurrency: int, total: int, versions: int = 1
) -> dict[str, Any]:
    await route_split(url, versions)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        fleet = Fleet(url, versions=versions)
        await fleet.start(session, workers)
        dispatcher = Dispatcher(session, url.replace("ws://", "http://"))
        queue = iter(range(total))

        async def lane() -> None:
            for _ in queue:
                await dispatcher.create()

        began = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(concurrency)))
        await wait_assigned(fleet, total, 60)
        elapsed = max(fleet.assigned_at.values()) - began
        await fleet.close()
    return {
        "workers": workers, "concurrency": concurrency, "dispatched": total,
        "assigned": len(fleet.assigned_at), "errors": dispatcher.errors,
        "assignments_per_s": len(fleet.assigned_at) / elapsed,
    }  # fmt: skip


async def memory_phase(url: str, pid: int, workers: int, jobs: int) -> dict[str, Any]:
    server = psutil.Process(pid)
    idle = server.memory_info().rss
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:
        fleet = Fleet(url, hold=True)
        await fleet.start(session, workers)
        with_workers = server.memory_info().rss
        dispatcher = Dispatcher(session, url.replace("ws://", "http://"))
        queue = iter(range(jobs))

        async def lane() -> None:
            for _ in queue:
                await dispatcher.create()

        await asyncio.gather(*(lane() for _ in range(32)))
        await wait_assigned(fleet, jobs, 120)
        await asyncio.sleep(1)  # let the recorder's last batch land
        loaded = server.memory_info().rss
        await fleet.close()
    return {
        "workers": workers, "live_jobs": len(fleet.assigned_at), "errors": dispatcher.errors,
        "rss_idle_mb": idle / 2**20, "rss_workers_mb": with_workers / 2**20,
        "rss_loaded_mb": loaded / 2**20,
    }  # fmt: skip


async def main(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": f"{os.cpu_count()} cores"}
    phases = (
        {"reference", "latency", "throughput", "memory", "routing"}
        if args.phase == "all"
        else {args.phase}
    )
    with tempfile.TemporaryDirectory() as tmp:
        if "reference" in phases or "latency" in phases:
            echo = await echo_rtt(2000)
            results["reference"] = {
                "echo_p50_ms": pct(echo, 50) * 1e3,
                "echo_p99_ms": pct(echo, 99) * 1e3,
            }
        for phase in ("latency", "throughput", "routing", "memory"):
            if phase not in phases:
                continue
            data = Path(tmp) / phase
            data.mkdir()
            if phase == "routing":  # servers of its own, one per run
                results[phase] = await routing_pairs(data, args)
                continue
            proc, url = start_server(data)
            try:
                if phase == "latency":
                    results[phase] = await latency_phase(
                        url, args.workers, args.rate, args.duration
                    )
                elif phase == "throughput":
                    results[phase] = await throughput_phase(
                        url, args.workers, args.concurrency, args.total
                    )
                else:
                    results[phase] = await memory_phase(
                        url, proc.pid, args.memory_workers, args.memory_jobs
                    )
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
    return results


async def routing_pairs(data: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Single-version and two-version runs alternately, each on a fresh server."""
    pairs = []
    for i in range(args.pairs):
        pair = {}
        for versions in (1, 2):
            run = data / f"{i}-{versions}"
            run.mkdir()
            proc, url = start_server(run)
            try:
                pair[versions] = {
                    "latency": await latency_phase(
                        url, args.workers, args.rate, args.duration, versions=versions
                    ),
                    "throughput": await throughput_phase(
                        url, args.workers, args.concurrency, args.total, versions=versions
                    ),
                }
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
        one, two = pair[1], pair[2]
        pairs.append(
            {
                "single": one,
                "routed": two,
                "p99_ratio": two["latency"]["p99_ms"] / one["latency"]["p99_ms"],
                "throughput_ratio": two["throughput"]["assignments_per_s"]
                / one["throughput"]["assignments_per_s"],
            }
        )
        print(
            f"  pair {i + 1}: p99 {one['latency']['p99_ms']:.1f} -> "
            f"{two['latency']['p99_ms']:.1f} ms, throughput "
            f"{one['throughput']['assignments_per_s']:.0f} -> "
            f"{two['throughput']['assignments_per_s']:.0f}/s",
            flush=True,
        )
    return pairs


def report(results: dict[str, Any]) -> None:
    ref = results.get("reference", {})
    if ref:
        print(
            f"loopback WebSocket RTT (aiohttp echo): p50 {ref['echo_p50_ms']:.3f} ms, p99 {ref['echo_p99_ms']:.3f} ms"
        )
    if "latency" in results:
        lat = results["latency"]
        print(
            f"latency: {lat['dispatched']} dispatches at {lat['rate']:g}/s over {lat['workers']} workers: "
            f"p50 {lat['p50_ms']:.2f} ms, p99 {lat['p99_ms']:.2f} ms, max {lat['max_ms']:.1f} ms, "
            f"{lat['assigned']} assigned, {lat['errors']} errors"
        )
        print(
            f"  protocol ping/pong through voicefleet: p50 {lat['ping_p50_ms']:.3f} ms, p99 {lat['ping_p99_ms']:.3f} ms"
        )
        if ref:
            print(
                f"  p99 / echo RTT p50 = {lat['p99_ms'] / ref['echo_p50_ms']:.1f}x (target <= 5x)"
            )
    if "throughput" in results:
        t = results["throughput"]
        print(
            f"throughput: {t['assigned']}/{t['dispatched']} assigned with {t['concurrency']} in flight: "
            f"{t['assignments_per_s']:.0f} assignments/s (target >= 3000/s), {t['errors']} errors"
        )
    if "routing" in results:
        pairs = results["routing"]
        p99 = statistics.median(p["p99_ratio"] for p in pairs)
        tput = statistics.median(p["throughput_ratio"] for p in pairs)
        print(
            f"two-version routing (90/10) vs one version, {len(pairs)} alternating pair(s): "
            f"p99 x{p99:.2f}, throughput x{tput:.2f} (medians; target: within 10 %)"
        )
        for i, p in enumerate(pairs):
            print(
                f"  pair {i + 1}: p99 x{p['p99_ratio']:.2f}, throughput x{p['throughput_ratio']:.2f}"
            )
    if "memory" in results:
        m = results["memory"]
        print(
            f"memory: {m['workers']} workers, {m['live_jobs']} live jobs: server RSS {m['rss_loaded_mb']:.0f} MB "
            f"(idle {m['rss_idle_mb']:.0f} MB, with workers {m['rss_workers_mb']:.0f} MB; target <= 300 MB)"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--phase",
        default="all",
        choices=["all", "reference", "latency", "throughput", "memory", "routing"],
    )
    parser.add_argument("--workers", type=int, default=200)
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--total", type=int, default=10_000)
    parser.add_argument("--memory-workers", type=int, default=1000)
    parser.add_argument("--memory-jobs", type=int, default=10_000)
    parser.add_argument("--pairs", type=int, default=3, help="routing: alternating pairs")
    parser.add_argument("--quick", action="store_true", help="small numbers: a smoke run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.workers, args.rate, args.duration = 20, 100, 3
        args.total, args.memory_workers, args.memory_jobs = 1000, 50, 500
    results = asyncio.run(main(args))
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
