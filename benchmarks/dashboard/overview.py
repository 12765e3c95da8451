"""Dashboard overview benchmark: render time and the server's CPU for its live updates.

    .venv/bin/python benchmarks/dashboard/overview.py [--agents 50 --instances 500
        --sessions 5000 --renders 20 --seconds 60 --streams 1,5 --churn 0,20]

Starts `vf server --dev` (SQLite, log level warning) in its own process and fills it with:
  - 50 agents, each created through the control API, with a "production" deployment of 10
    instances (`POST /api/v1/agents/{name}/scale`, as `vf agent scale 10` does);
  - 500 instance records in the server's store (the project's own `Repo`, the rows the fleet
    writes when it starts an instance: deployment production, version v1, status ready). No
    process is started for them: the runtime is not asked;
  - 500 protocol peers (aiohttp WebSocket clients speaking the worker protocol, tests/peers.py),
    one per instance, each registered with a `worker_token` naming that agent, version and
    instance, as a deployed instance's worker is;
  - 5,000 sessions dispatched through Twirp `CreateDispatch`, accepted by the peers and kept
    running (the peers report JS_RUNNING and never end them).

Then, logged in to the dashboard with the API key and secret (its session cookie):
  render   GET / (the overview page, whole HTML) --renders times: median, p90, max; each
           after a new session was dispatched (a change the page shows) and SHARED_FOR after
           the last, so none is served by the render before it
  stream   the server process's CPU (psutil cpu_times, user+system) over --seconds with no
           dashboard open, then with K overview streams (/dashboard/events) open, for each K
           in --streams; as a share of one core. For each rate C in --churn: C sessions a
           second end (the peer reports JS_SUCCESS) and as many new ones are dispatched, so
           the page has something new to show every second (0: a steady fleet).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
from livekit.protocol import agent

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]
from tests.peers import Peer  # noqa: E402
from tests.support import DEV_KEY, DEV_SECRET, Server, admin_token  # noqa: E402
from voicefleet.dashboard.overview import SHARED_FOR  # noqa: E402
from voicefleet.fleet import Lifecycle  # noqa: E402
from voicefleet.protocol import tokens  # noqa: E402
from voicefleet.store.db import open_engine  # noqa: E402
from voicefleet.store.models import InstanceRow  # noqa: E402
from voicefleet.store.repo import Repo  # noqa: E402

VERSION = "v1"
STATUS_INTERVAL = 2.5


async def populate(server: Server, agents: int, instances: int) -> dict[str, tuple[str, str]]:
    """Agents through the API, their instance records in the store: instance id -> (agent
    name, agent id)."""
    headers = {"Authorization": f"Bearer {admin_token()}"}
    per_agent = instances // agents
    ids: dict[str, tuple[str, str]] = {}
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=30) as http:
        for n in range(agents):
            name = f"agent-{n:02d}"
            r = await http.post("/api/v1/agents", json={"name": name})
            r.raise_for_status()
            agent_id = r.json()["id"]
            r = await http.post(
                f"/api/v1/agents/{name}/scale",
                json={"deployment": "production", "replicas": per_agent},
            )
            r.raise_for_status()
            for i in range(per_agent):
                ids[f"{name}-{VERSION}-{i:04d}"] = (name, agent_id)
    engine = await open_engine(f"sqlite+aiosqlite:///{server.data_dir / 'voicefleet.db'}")
    now = time.time()
    await Repo(engine).save(
        *(
            InstanceRow(
                id=instance_id, agent_id=agent_id, deployment="production", version=VERSION,
                status=Lifecycle.READY, created_at=now, updated_at=now,
            )
            for instance_id, (_, agent_id) in ids.items()
        )
    )  # fmt: skip
    await engine.dispose()
    return ids


async def connect_peers(server: Server, ids: dict[str, tuple[str, str]], peers: list[Peer]) -> None:
    async def one(instance_id: str, name: str, agent_id: str) -> Peer:
        identity = tokens.WorkerIdentity(agent=agent_id, version=VERSION, instance=instance_id)
        peer = await Peer.connect(
            server.ws_url,
            name,
            params={"worker_token": tokens.mint_worker_token(DEV_SECRET, identity)},
            deployment="production",
        )
        peer.end_jobs = False
        return peer

    items = list(ids.items())
    for start in range(0, len(items), 50):
        batch = items[start : start + 50]
        peers += await asyncio.gather(*(one(i, name, aid) for i, (name, aid) in batch))


async def dispatch(server: Server, names: list[str], sessions: int) -> None:
    """`sessions` jobs round-robin over the agents, 32 in flight; until all are running."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(sessions):
        queue.put_nowait(n)

    async def sender(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            n = queue.get_nowait()
            room = f"bench-{n}"
            token = tokens.mint(DEV_KEY, DEV_SECRET, video={"roomAdmin": True, "room": room})
            r = await http.post(
                "/twirp/livekit.AgentDispatchService/CreateDispatch",
                json={"agent_name": names[n % len(names)], "room": room},
                headers={"Authorization": f"Bearer {token}"},
            )
            r.raise_for_status()

    async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
        await asyncio.gather(*(sender(http) for _ in range(32)))


async def keep_reporting(peers: list[Peer]) -> None:
    """Each peer's status every 2.5 s, as a livekit-agents worker sends it (UPDATE_STATUS_INTERVAL
    in livekit/agents/worker.py); the server disconnects a worker that stays silent."""
    while True:
        for peer in list(peers):
            jobs = len(peer.assignments)
            await peer.status(load=min(jobs / 50, 0.5), jobs=jobs)
            await asyncio.sleep(STATUS_INTERVAL / len(peers))
        await asyncio.sleep(0.1)


async def churn(server: Server, peers: list[Peer], names: list[str], rate: float) -> None:
    """`rate` sessions a second end (their peer reports success) and as many new ones are
    dispatched (round-robin over the agents), so the number running stays the same."""
    n = 0
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
        while True:
            peer = peers[n % len(peers)]
            if peer.assignments:
                job = peer.assignments.pop(0).job
                await peer.update(job.id, agent.JobStatus.JS_SUCCESS)
                room = f"bench-churn-{n}"
                token = tokens.mint(DEV_KEY, DEV_SECRET, video={"roomAdmin": True, "room": room})
                r = await http.post(
                    "/twirp/livekit.AgentDispatchService/CreateDispatch",
                    json={"agent_name": job.agent_name, "room": room},
                    headers={"Authorization": f"Bearer {token}"},
                )
                r.raise_for_status()
            n += 1
            await asyncio.sleep(1 / rate)


def running_jobs(peers: list[Peer]) -> int:
    return sum(len(p.assignments) for p in peers)


def log_in(server: Server) -> httpx.Client:
    client = httpx.Client(base_url=server.url, timeout=60)
    r = client.post(
        "/dashboard/login",
        data={"api_key": DEV_KEY, "api_secret": DEV_SECRET, "next": "/"},
        follow_redirects=False,
    )
    assert r.status_code == 303 and client.cookies, r.text
    return client


def renders(client: httpx.Client, n: int, names: list[str]) -> list[float]:
    times = []
    for k in range(n):
        # The page re-renders only after a change it shows, and one render serves every page
        # that asks within SHARED_FOR of it: dispatch a session and wait that out, so each GET
        # renders afresh.
        room = f"bench-render-{k}"
        token = tokens.mint(DEV_KEY, DEV_SECRET, video={"roomAdmin": True, "room": room})
        client.post(
            "/twirp/livekit.AgentDispatchService/CreateDispatch",
            json={"agent_name": names[k % len(names)], "room": room},
            headers={"Authorization": f"Bearer {token}"},
        ).raise_for_status()
        time.sleep(SHARED_FOR + 0.1)
        began = time.perf_counter()
        r = client.get("/")
        times.append(time.perf_counter() - began)
        r.raise_for_status()
        assert "<h1>Overview</h1>" in r.text or "Overview" in r.text
    return times


async def cpu_with_streams(
    server: Server, cookies: dict[str, str], streams: int, seconds: float
) -> tuple[float, int]:
    """The server's CPU seconds over `seconds` with `streams` overview streams open (after
    each sent its first event); and how many events they received meanwhile."""
    proc = psutil.Process(server.proc.pid if server.proc else 0)
    received = 0
    ready = asyncio.Event()
    opened = 0

    async def reader(http: httpx.AsyncClient) -> None:
        nonlocal received, opened
        async with http.stream("GET", "/dashboard/events") as r:
            r.raise_for_status()
            first, in_event = True, False
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    in_event = True
                elif line == "" and in_event:
                    in_event = False
                    received += 1
                    if first:
                        first = False
                        opened += 1
                        if opened == streams:
                            ready.set()

    async with httpx.AsyncClient(base_url=server.url, cookies=cookies, timeout=None) as http:
        tasks = [asyncio.create_task(reader(http)) for _ in range(streams)]
        if streams:
            await asyncio.wait_for(ready.wait(), 120)
            await asyncio.sleep(2)  # past the first renders
        received = 0
        before = proc.cpu_times()
        await asyncio.sleep(seconds)
        after = proc.cpu_times()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    used = (after.user - before.user) + (after.system - before.system)
    return used, received


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--agents", type=int, default=50)
    ap.add_argument("--instances", type=int, default=500)
    ap.add_argument("--sessions", type=int, default=5000)
    ap.add_argument("--renders", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--streams", default="1,5")
    ap.add_argument("--churn", default="0,20", help="sessions ended and started a second")
    args = ap.parse_args()
    stream_counts = [int(k) for k in args.streams.split(",") if k]
    churn_rates = [float(c) for c in args.churn.split(",") if c]

    with tempfile.TemporaryDirectory(prefix="vf-dash-bench-") as tmp:
        server = Server(Path(tmp), "--log-level", "warning").start()
        peers: list[Peer] = []
        try:
            began = time.monotonic()
            ids = await populate(server, args.agents, args.instances)
            reporting = asyncio.create_task(keep_reporting(peers))
            await connect_peers(server, ids, peers)
            names = sorted({name for name, _ in ids.values()})
            await dispatch(server, names, args.sessions)
            deadline = time.monotonic() + 120
            while running_jobs(peers) < args.sessions:
                if time.monotonic() > deadline:
                    raise SystemExit(f"only {running_jobs(peers)} sessions running")
                await asyncio.sleep(0.2)
            setup = time.monotonic() - began
            workers = len(server.workers())
            print(
                f"set up in {setup:.0f} s: {len(names)} agents, {len(ids)} instance records, "
                f"{workers} workers, {running_jobs(peers)} sessions running",
                flush=True,
            )

            client = log_in(server)
            page = client.get("/").text
            shown = f"{len(peers)} worker(s) connected · {args.sessions} live session(s)"
            assert shown in page, "the overview does not show the live state"
            times = await asyncio.to_thread(renders, client, args.renders, names)
            cookies = dict(client.cookies)
            client.close()
            rss = psutil.Process(server.proc.pid if server.proc else 0).memory_info().rss

            rows = [
                (
                    f"GET / (overview, {len(page) / 1024:.0f} KB of HTML), {args.renders} renders",
                    f"median {1000 * statistics.median(times):.0f} ms, "
                    f"p90 {1000 * pct(times, 0.9):.0f} ms, max {1000 * max(times):.0f} ms",
                )
            ]
            for rate in churn_rates:
                churning = asyncio.create_task(churn(server, peers, names, rate)) if rate else None
                what = f"{rate:g} sessions/s ending and starting" if rate else "steady fleet"
                idle, _ = await cpu_with_streams(server, cookies, 0, args.seconds)
                rows.append(
                    (
                        f"server CPU, {what}, no dashboard open, {args.seconds:g} s",
                        f"{100 * idle / args.seconds:.1f} % of a core",
                    )
                )
                for k in stream_counts:
                    used, events = await cpu_with_streams(server, cookies, k, args.seconds)
                    rows.append(
                        (
                            f"server CPU, {what}, {k} overview stream(s) open, {args.seconds:g} s",
                            f"{100 * used / args.seconds:.1f} % of a core "
                            f"(+{100 * (used - idle) / args.seconds:.1f} % over idle; "
                            f"{events} events sent)",
                        )
                    )
                if churning is not None:
                    churning.cancel()
                    await asyncio.gather(churning, return_exceptions=True)
            rows.append(("server RSS", f"{rss / 2**20:.0f} MB"))
            print("\n| figure | measured |\n|---|---|")
            for what, value in rows:
                print(f"| {what} | {value} |")
            reporting.cancel()
            lost = [line for line in server.log().splitlines() if "dispatched again" in line]
            if lost:
                print(f"warning: {len(lost)} jobs dispatched again (a peer was disconnected)")
        finally:
            await asyncio.gather(*(p.close() for p in peers), return_exceptions=True)
            server.stop()


if __name__ == "__main__":
    asyncio.run(main())
