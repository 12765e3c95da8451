"""voicefleet's own time in the gateway's path, pass by pass, apart from the hops around it.

    .venv/bin/python benchmarks/livekit/gateway_split.py                # 300 jobs, ~40 s
    .venv/bin/python benchmarks/livekit/gateway_split.py --src /tmp/old/src --src src

side_by_side.py measures the gateway end to end, against a real livekit-server and real
livekit-agents workers; what it adds to LiveKit's dispatch there mixes voicefleet's own work
with the extra loopback hops and process wake-ups of a relay. This rig separates the two.

This process plays a LiveKit server's agent endpoint (register, availability request,
assignment: the wire protocol only, no rooms) and the workers (each answers an offer at once,
then reports the job running and done). `vf server --dev` runs as a child, in gateway mode
towards this process, with a timestamp (`time.perf_counter`) at the edges of each pass a job
makes through it:

  offer       LiveKit's availability request in (the upstream connection's `data_received`)
              -> handled (`Upstream._handle`) -> the request out to the worker (socket write)
  answer      the worker's answer in (uvicorn's `data_received`) -> handled (the endpoint's
              `_handle`) -> the answer out to LiveKit
  assignment  LiveKit's assignment in -> handled -> out to the worker

Jobs go one at a time, at `--rate`, alternating between **direct** (LiveKit -> worker) and each
voicefleet (LiveKit -> voicefleet -> worker). Per setup: p50 of offer (request sent -> the
worker has it), answer (the worker answered -> it has the assignment) and their sum; "added" is
the median over jobs of gateway - direct, each against the direct job dispatched beside it.
Then, per voicefleet, each pass's p50: in -> handled, handled -> out, in -> out.

`--src DIR` (repeatable) starts one voicefleet per source tree, e.g. a copy of an earlier
version's `src`: both run beside each other, on the same minutes of the machine. Run them in
both orders: on the 2-core VM the first one started measured 0.1-0.4 ms less end to end in
every run, whichever tree it ran (its own time per pass did not move with the order). The stamps
wrap internals of websockets, uvicorn's websockets-sansio protocol and asyncio's selector
transports (the loop `vf server` runs on): for measuring, not for production.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CHILD = "--child-stamps"


# -- the child: vf server with stamps ------------------------------------------------------------


def child(stamps: str, argv: list[str]) -> None:
    from asyncio import selector_events

    from uvicorn.protocols.websockets import websockets_sansio_impl as uv
    from websockets.asyncio import connection as wsc

    from voicefleet.dispatch import endpoint
    from voicefleet.gateway import upstream

    events: list[tuple[Any, ...]] = []
    now = time.perf_counter
    upstream_transports: set[int] = set()
    lk_received, lk_made = wsc.Connection.data_received, wsc.Connection.connection_made
    worker_received = uv.WebSocketsSansIOProtocol.data_received
    write = selector_events._SelectorSocketTransport.write
    handle_worker, handle_lk = endpoint._handle, upstream.Upstream._handle

    def on_lk_data(self: Any, data: bytes) -> None:
        events.append(("in_lk", now()))
        lk_received(self, data)

    def on_lk_made(self: Any, transport: Any) -> None:
        upstream_transports.add(id(transport))
        lk_made(self, transport)

    def on_worker_data(self: Any, data: bytes) -> None:
        events.append(("in_w", now()))
        worker_received(self, data)

    def on_write(self: Any, data: Any) -> None:
        events.append(("out_lk" if id(self) in upstream_transports else "out_w", now()))
        write(self, data)

    def on_worker_msg(service: Any, worker: Any, msg: Any) -> None:
        if msg.WhichOneof("message") == "availability":
            events.append(("answer", now(), msg.availability.job_id))
        handle_worker(service, worker, msg)

    def on_lk_msg(self: Any, data: bytes) -> bool:
        msg = upstream._parse(data)
        which = msg.WhichOneof("message") if msg is not None else None
        if which == "availability":
            events.append(("offer", now(), msg.availability.job.id))  # type: ignore[union-attr]
        elif which == "assignment":
            events.append(("assignment", now(), msg.assignment.job.id))  # type: ignore[union-attr]
        return bool(handle_lk(self, data))

    wsc.Connection.data_received = on_lk_data  # type: ignore[method-assign]
    wsc.Connection.connection_made = on_lk_made  # type: ignore[method-assign]
    uv.WebSocketsSansIOProtocol.data_received = on_worker_data  # type: ignore[method-assign]
    selector_events._SelectorSocketTransport.write = on_write  # type: ignore[method-assign]
    endpoint._handle = on_worker_msg
    upstream.Upstream._handle = on_lk_msg  # type: ignore[method-assign]
    atexit.register(lambda: Path(stamps).write_text(json.dumps(events)))

    from voicefleet.cli.main import main

    sys.argv = ["vf", *argv]
    main()


# (kind of the handled event) -> (the frame in before it, the frame out after it)
PASSES = {
    "offer": ("in_lk", "out_w"),
    "answer": ("in_w", "out_lk"),
    "assignment": ("in_lk", "out_w"),
}


def passes(events: list[list[Any]]) -> dict[str, list[tuple[float, float]]]:
    """Per pass kind: (in -> handled, handled -> out) in ms, for each measured job."""
    out: dict[str, list[tuple[float, float]]] = {k: [] for k in PASSES}
    for i, e in enumerate(events):
        if e[0] not in PASSES or e[2].startswith("warm"):
            continue
        first, last = PASSES[e[0]]
        t_in = next((x[1] for x in reversed(events[:i]) if x[0] == first), None)
        t_out = next((x[1] for x in events[i + 1 :] if x[0] == last), None)
        if t_in is not None and t_out is not None:
            out[e[0]].append(((e[1] - t_in) * 1e3, (t_out - e[1]) * 1e3))
    return out


# -- this process: LiveKit's agent endpoint and the workers ---------------------------------------


class Rig:
    def __init__(self) -> None:
        self.workers: dict[str, Any] = {}  # agent name -> its connection to "LiveKit"
        self.done: dict[str, asyncio.Future[None]] = {}
        self.stamps: dict[str, dict[str, float]] = {}
        self.registered = asyncio.Event()  # a worker registered

    async def livekit(self, ws: Any) -> None:
        from livekit.protocol import agent

        name = ""
        async for data in ws:
            msg = agent.WorkerMessage.FromString(data)
            which = msg.WhichOneof("message")
            if which == "register":
                name = msg.register.agent_name
                self.workers[name] = ws
                self.registered.set()
                answer = agent.RegisterWorkerResponse(worker_id=f"AW_{name}")
                await ws.send(agent.ServerMessage(register=answer).SerializeToString())
            elif which == "availability" and msg.availability.available:
                job = agent.Job(id=msg.availability.job_id, agent_name=name)
                job.room.name = f"room-{job.id}"
                assignment = agent.JobAssignment(job=job, token="room-token", url="ws://sfu")
                await ws.send(agent.ServerMessage(assignment=assignment).SerializeToString())

    async def worker(self, url: str, name: str, headers: dict[str, str]) -> None:
        from livekit.protocol import agent
        from websockets.asyncio.client import connect

        async with connect(f"{url}/agent", additional_headers=headers, proxy=None) as ws:
            register = agent.RegisterWorkerRequest(type=agent.JobType.JT_ROOM, agent_name=name)
            await ws.send(agent.WorkerMessage(register=register).SerializeToString())
            async for data in ws:
                msg = agent.ServerMessage.FromString(data)
                which = msg.WhichOneof("message")
                t = time.perf_counter()
                if which == "availability":
                    job_id = msg.availability.job.id
                    self.stamps[job_id].update(received=t, accepted=time.perf_counter())
                    answer = agent.AvailabilityResponse(
                        job_id=job_id, available=True, participant_identity=f"agent-{job_id}"
                    )
                    await ws.send(agent.WorkerMessage(availability=answer).SerializeToString())
                elif which == "assignment":
                    job_id = msg.assignment.job.id
                    self.stamps[job_id]["assigned"] = t
                    for status in (agent.JobStatus.JS_RUNNING, agent.JobStatus.JS_SUCCESS):
                        update = agent.UpdateJobStatus(job_id=job_id, status=status)
                        await ws.send(agent.WorkerMessage(update_job=update).SerializeToString())
                    self.done.pop(job_id).set_result(None)

    async def dispatch(self, name: str, job_id: str) -> dict[str, float]:
        from livekit.protocol import agent

        job = agent.Job(id=job_id, dispatch_id=f"AD_{job_id}", agent_name=name)
        job.room.name, job.room.sid = f"room-{job_id}", f"RM_{job_id}"
        self.done[job_id] = asyncio.get_running_loop().create_future()
        self.stamps[job_id] = {"sent": time.perf_counter()}
        request = agent.AvailabilityRequest(job=job)
        await self.workers[name].send(agent.ServerMessage(availability=request).SerializeToString())
        await asyncio.wait_for(self.done[job_id], 10)
        s = self.stamps.pop(job_id)
        return {
            "offer": (s["received"] - s["sent"]) * 1e3,
            "answer": (s["assigned"] - s["accepted"]) * 1e3,
            "total": (s["assigned"] - s["sent"]) * 1e3,
        }


def p50(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def run(args: argparse.Namespace) -> None:
    from websockets.asyncio.server import serve

    from voicefleet.protocol import tokens

    rig = Rig()
    server = await serve(rig.livekit, "127.0.0.1", 0)
    lk_url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    work = Path(tempfile.mkdtemp(prefix="voicefleet-gateway-split-"))
    print(f"logs in {work}")
    srcs = args.src or [str(ROOT / "src")]
    names = ["direct"] + [f"vf{k}" for k in range(len(srcs))]
    procs: list[subprocess.Popen[bytes]] = []
    tasks = [asyncio.create_task(rig.worker(lk_url, "direct", {}))]
    token = tokens.mint("devkey", "secret", video={"agent": True})
    try:
        for k, src in enumerate(srcs):
            ready = work / f"ready-{k}.json"
            argv = [
                "server", "--dev", "--host", "127.0.0.1", "--port", "0",
                "--data-dir", str(work / f"data-{k}"), "--ready-file", str(ready),
                "--log-level", args.log_level, "--livekit-url", lk_url,
                "--livekit-api-key", "bench", "--livekit-api-secret", "bench-secret-" + "x" * 24,
            ]  # fmt: skip
            stamps = work / f"stamps-{k}.json"
            env = {**os.environ, "PYTHONPATH": str(Path(src).resolve())}
            with open(work / f"vf-{k}.log", "wb") as log:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, __file__, CHILD, str(stamps), *argv],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                    )
                )
            while not ready.exists():
                if procs[-1].poll() is not None:
                    raise SystemExit((work / f"vf-{k}.log").read_text())
                await asyncio.sleep(0.05)
            url = json.loads(ready.read_text())["url"].replace("http://", "ws://")
            headers = {"Authorization": f"Bearer {token}"}
            tasks.append(asyncio.create_task(rig.worker(url, f"vf{k}", headers)))
        while not set(names) <= rig.workers.keys():
            rig.registered.clear()
            await asyncio.wait_for(rig.registered.wait(), 30)
        await asyncio.sleep(1)
        for i in range(20):  # connections and code paths warm; not measured
            for name in names:
                await rig.dispatch(name, f"warm-{name}-{i}")
        rows: dict[str, list[dict[str, float]]] = {n: [] for n in names}
        start = time.monotonic()
        for i in range(args.jobs):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                await asyncio.sleep(max(0.0, start + i / args.rate - time.monotonic()))
                rows[name].append(await rig.dispatch(name, f"{name}-{i}"))
        for t in tasks:
            t.cancel()
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        server.close()

    print(f"\n{args.jobs} jobs per setup at {args.rate:g}/s; p50, ms")
    print("| setup | offer | answer | total | added: offer | answer | total |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        cells = [p50([r[k] for r in rows[name]]) for k in ("offer", "answer", "total")]
        added = [
            p50([g[k] - d[k] for d, g in zip(rows["direct"], rows[name], strict=True)])
            for k in ("offer", "answer", "total")
        ]
        label = "direct" if name == "direct" else f"{name}: {srcs[int(name[2:])]}"
        print(f"| {label} | " + " | ".join(f"{v:.3f}" for v in cells + added) + " |")
    print("\nvoicefleet's own time per pass, p50, ms: in -> handled + handled -> out = in -> out")
    for k in range(len(srcs)):
        split = passes(json.loads((work / f"stamps-{k}.json").read_text()))
        parts = []
        for kind, got in split.items():
            a, b = p50([x[0] for x in got]), p50([x[1] for x in got])
            parts.append(f"{kind} {a:.3f} + {b:.3f} = {p50([x + y for x, y in got]):.3f}")
        whole = sum(p50([x + y for x, y in got]) for got in split.values())
        print(f"  vf{k}: " + "; ".join(parts) + f"; all three {whole:.3f}")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == CHILD:
        child(sys.argv[2], sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300, help="jobs per setup")
    parser.add_argument("--rate", type=float, default=20.0, help="job slots per second")
    parser.add_argument("--log-level", default="warning", help="vf server's")
    parser.add_argument(
        "--src", action="append", default=[], help="a voicefleet source tree (repeatable)"
    )
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
