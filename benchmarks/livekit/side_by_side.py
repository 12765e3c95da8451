"""LiveKit's own dispatch, voicefleet standalone and LiveKit -> voicefleet gateway, side by side.

    .venv/bin/python benchmarks/livekit/side_by_side.py            # ~8 minutes on 2 cores
    .venv/bin/python benchmarks/livekit/side_by_side.py --quick    # smoke run, ~1.5 minutes

One run, one machine, the same worker code, three setups:

  a  livekit    workers registered with livekit-server; dispatch through its
                AgentDispatchService (no voicefleet in the path)
  b  vf         workers registered with voicefleet (standalone); dispatch through voicefleet's
                AgentDispatchService (Twirp) with the livekit-api client; rooms on livekit-server
  c  gateway    workers registered with voicefleet, voicefleet registered with livekit-server as
                their agent's worker; dispatch through livekit-server's AgentDispatchService

Everything runs inside a network namespace of its own (tests/livekit.py): livekit-server v1.13.5,
`vf server --dev --livekit-url …` (log level warning) and, registered from the start and for the
whole run, four sets of real livekit-agents 1.8.9 workers: `--bench-workers` workers of
benchmarks/livekit/stamp_agent.py with livekit-server and as many with voicefleet, and one worker
of examples/voice_agent with each. Each phase alternates the setups in rounds (a b c a b c ...),
so that whatever else the machine does falls on all three alike; figures are medians over rounds.

Phases:

  latency     `--jobs` dispatches at `--rate` per second (open loop, after 3 unmeasured ones), one
              room each; latency = the CreateDispatch call began (the dispatcher's clock) -> the
              worker had its assignment (livekit-agents' own `assigned_at`, written by the
              job's entrypoint: stamp_agent.py). Split into: offer (call began -> the worker's
              availability request arrived), answer (its request handler accepted -> the
              assignment arrived) and the handler between. p50 and p99 per round.
  throughput  `--burst` dispatches, `--in-flight` at a time, as fast as they are answered; jobs
              assigned per second = burst / (first call began -> last assignment). Jobs never
              join their room (stamp_agent.py writes a line and ends). CPU of every process
              over the burst, per job.
  calls       `--calls` simultaneous real calls: tests/caller.py joins a room, the voice agent is
              dispatched to it and answers `--utterances` utterances. CPU seconds (utime + stime
              of the process and its descendants, /proc through psutil) from the dispatch to the
              end of the job, of livekit-server, of the agent's worker (its job processes
              included) and of voicefleet, and their peak RSS (sampled every 0.2 s): CPU per call
              as % of one core, voicefleet's share of the call's CPU (livekit-server + the
              worker + voicefleet when it is in the path), memory per call.

The machine's other load is not controlled: it shows as spread between rounds. The callers'
own CPU (the simulated client side) is left out of every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from livekit import api  # noqa: E402

from tests.livekit import (  # noqa: E402  # noqa: E402
    VOICE_AGENT,
    Caller,
    LiveKitServer,
    NsVoicefleet,
    NsWorker,
    livekit_server,
    server_binary,
)
from tests.support import DEV_KEY, DEV_SECRET, wait_for  # noqa: E402

STAMP_AGENT = Path(__file__).with_name("stamp_agent.py")
ANY_PORT = Path(__file__).with_name("any_port.py")  # the voice agent, unchanged, on a free port
SETUPS = ("a", "b", "c")
NAMES = {"a": "livekit", "b": "vf", "c": "gateway"}
BENCH_DIRECT, BENCH_VF = "bench-direct", "bench"
VOICE_DIRECT, VOICE_VF = "call-direct", "call-agent"
# Rooms nobody joins (the dispatch benchmarks make thousands) close 10 s after they were made,
# not after LiveKit's default 5 minutes: the later phases do not run beside them.
ROOM_YAML = "room:\n  empty_timeout: 10\n  departure_timeout: 1\n"


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def med(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    """median (min-max) of the rounds."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


# -- the rig -----------------------------------------------------------------------------------


class Stamps:
    """The stamp_agent workers' lines (one file per worker), read as they grow."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self._offsets = dict.fromkeys(paths, 0)
        self._partial = dict.fromkeys(paths, b"")
        self.by_tag: dict[str, list[dict[str, Any]]] = {}

    def poll(self) -> None:
        for path in self.paths:
            if not path.exists():
                continue
            with open(path, "rb") as f:
                f.seek(self._offsets[path])
                data = f.read()
            self._offsets[path] += len(data)
            lines = (self._partial[path] + data).split(b"\n")
            self._partial[path] = lines.pop()
            for line in lines:
                stamp = json.loads(line)
                stamp["meta"] = json.loads(stamp["metadata"] or "{}")
                key = f"{stamp['kind']}:{stamp['meta'].get('tag', '')}"
                self.by_tag.setdefault(key, []).append(stamp)

    async def wait(
        self, tag: str, n: int, timeout: float, kind: str = "assigned"
    ) -> list[dict[str, Any]]:
        """The `kind` lines ("assigned", "entered") of `tag`'s jobs, once there are `n` (or at
        the timeout, those there are)."""
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            got = self.by_tag.get(f"{kind}:{tag}", [])
            if len(got) >= n or time.monotonic() > deadline:
                return got
            await asyncio.sleep(0.05)


@dataclass
class Rig:
    lk: LiveKitServer
    vf: NsVoicefleet
    stamps: Stamps
    workers: dict[str, list[NsWorker]]  # "bench-a", "bench-vf", "voice-a", "voice-vf"

    def target(self, setup: str, voice: bool = False) -> tuple[str, str, str, str]:
        """(url, key, secret, agent name) that setup dispatches to."""
        if setup == "a":
            return (
                self.lk.url,
                self.lk.api_key,
                self.lk.api_secret,
                VOICE_DIRECT if voice else BENCH_DIRECT,
            )
        name = VOICE_VF if voice else BENCH_VF
        if setup == "b":
            return (self.vf.url, DEV_KEY, DEV_SECRET, name)
        return (self.lk.url, self.lk.api_key, self.lk.api_secret, name)

    def groups(self, setup: str, voice: bool = False) -> dict[str, list[int]]:
        """The processes whose CPU a setup's figures hold: name -> root pids (with descendants)."""
        kind = "voice" if voice else "bench"
        side = "a" if setup == "a" else "vf"
        assert self.lk.proc is not None
        return {
            "livekit-server": [self.lk.proc.pid],
            "voicefleet": [self.vf.proc.pid],
            "workers": [w.proc.pid for w in self.workers[f"{kind}-{side}"]],
        }


def tree(pids: list[int]) -> list[psutil.Process]:
    procs: list[psutil.Process] = []
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs += [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    return procs


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the processes and their descendants, the reaped ones included (a
    child's time moves to its parent's children_* when the parent waits for it)."""
    total = 0.0
    for p in tree(pids):
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for p in tree(pids):
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


def own_cpu() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system


class Meter:
    """CPU seconds of process groups between start() and stop(); peak RSS sampled meanwhile."""

    def __init__(self, groups: dict[str, list[int]], interval: float = 0.2) -> None:
        self.groups = groups
        self.interval = interval
        self.cpu: dict[str, float] = {}
        self.rss_before: dict[str, int] = {}
        self.rss_peak: dict[str, int] = {}
        self.seconds = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def start(self) -> Meter:
        self.rss_before = {g: rss_bytes(p) for g, p in self.groups.items()}
        self.rss_peak = dict(self.rss_before)
        self._cpu0 = {g: cpu_seconds(p) for g, p in self.groups.items()}
        self._own0 = own_cpu()
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            for g, pids in self.groups.items():
                self.rss_peak[g] = max(self.rss_peak[g], rss_bytes(pids))

    def stop(self) -> Meter:
        self.seconds = time.monotonic() - self._t0
        self.cpu = {g: cpu_seconds(p) - self._cpu0[g] for g, p in self.groups.items()}
        self.cpu["dispatcher (this process)"] = own_cpu() - self._own0
        self._stop.set()
        self._thread.join()
        return self


async def start_rig(work: Path, lk: LiveKitServer, bench_workers: int) -> Rig:
    vf = NsVoicefleet(lk, work / "voicefleet", log_level="warning").started()
    stamp_files: list[Path] = []
    workers: dict[str, list[NsWorker]] = {
        "bench-a": [],
        "bench-vf": [],
        "voice-a": [],
        "voice-vf": [],
    }
    for side in ("a", "vf"):
        for n in range(bench_workers):
            out = work / "stamps" / f"{side}-{n}.jsonl"
            out.parent.mkdir(parents=True, exist_ok=True)
            stamp_files.append(out)
            env = {"STAMP_FILE": str(out), "AGENT_NAME": BENCH_DIRECT if side == "a" else BENCH_VF}
            if side == "vf":
                env = vf.worker_env(**env)
            workers[f"bench-{side}"].append(
                NsWorker(lk, STAMP_AGENT, work / "workers" / f"bench-{side}-{n}.log", env)
            )
    voice_env = {
        "a": {"LIVEKIT_AGENT_NAME_OVERRIDE": VOICE_DIRECT},
        "vf": vf.worker_env(LIVEKIT_AGENT_NAME_OVERRIDE=VOICE_VF),
    }
    for side, env in voice_env.items():
        env = {**env, "AGENT_SCRIPT": str(VOICE_AGENT)}
        workers[f"voice-{side}"].append(
            NsWorker(lk, ANY_PORT, work / "workers" / f"voice-{side}.log", env)
        )
    rig = Rig(lk, vf, Stamps(stamp_files), workers)
    for group in workers.values():
        for w in group:
            await wait_for(w.registered, 120, f"a worker to register ({w.log_path})")

    def upstream() -> bool:
        names = {e.get("agentName") for e in lk.log_entries("worker registered")}
        return {BENCH_DIRECT, BENCH_VF, VOICE_DIRECT, VOICE_VF} <= names

    await wait_for(upstream, 60, "every agent to be registered with livekit-server")
    return rig


def stop_rig(rig: Rig) -> None:
    for group in rig.workers.values():
        for w in group:
            w.stop()
    rig.vf.stop()


# -- dispatching -------------------------------------------------------------------------------


async def dispatch_many(
    rig: Rig,
    setup: str,
    tag: str,
    n: int,
    *,
    rate: float = 0.0,
    in_flight: int = 0,
    warmup: int = 0,
    lane_rooms: bool = False,
) -> dict[str, Any]:
    """`n` CreateDispatch calls from inside the namespace: open loop at `rate` per second, one
    new room each, or closed loop in `in_flight` lanes, each dispatching into its own room
    (`<tag>-lane<k>`, see make_rooms). Each job's metadata carries the time its call began.
    Returns when every call has been answered."""
    url, key, secret, agent_name = rig.target(setup)

    async def inside() -> dict[str, Any]:
        client = api.LiveKitAPI(url, key, secret)
        calls: list[float] = []
        errors: list[str] = []

        async def one(i: int, label: str, room: str = "") -> None:
            began = time.time()
            meta = json.dumps({"tag": label, "i": i, "t": began})
            try:
                await client.agent_dispatch.create_dispatch(
                    api.CreateAgentDispatchRequest(
                        agent_name=agent_name, room=room or f"{label}-{i}", metadata=meta
                    )
                )
            except Exception as e:  # counted and shown, not fatal
                errors.append(repr(e))
                return
            if label == tag:
                calls.append(time.time() - began)

        try:
            for i in range(warmup):  # connection set up, code paths warm; not measured
                await one(i, f"{tag}-warm")
            t0 = time.time()
            if rate:
                start = time.monotonic()
                tasks = []
                for i in range(n):
                    await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
                    tasks.append(asyncio.create_task(one(i, tag)))
                await asyncio.gather(*tasks)
            else:
                todo = iter(range(n))

                async def lane(k: int) -> None:
                    for i in todo:
                        await one(i, tag, f"{tag}-lane{k}" if lane_rooms else "")

                await asyncio.gather(*(lane(k) for k in range(in_flight)))
            return {"t0": t0, "t_answered": time.time(), "call_s": calls, "errors": errors}
        finally:
            await client.aclose()

    return await rig.lk.ns.call(inside)


async def make_rooms(rig: Rig, names: list[str]) -> None:
    """Rooms on livekit-server, made before a burst and left to settle: each new room also
    makes livekit-server look for a worker of the unnamed agent (its automatic dispatch), which
    with none registered holds a slot of its 50-slot job pool for 1 s (psrpc's affinity
    timeout). A burst into new rooms measures that, not the dispatch path (see README)."""

    async def inside() -> None:
        client = rig.lk.client()
        try:
            await asyncio.gather(
                *(client.room.create_room(api.CreateRoomRequest(name=n)) for n in names)
            )
        finally:
            await client.aclose()

    await rig.lk.ns.call(inside)
    await asyncio.sleep(2.5)


async def no_rooms(rig: Rig, timeout: float = 30) -> None:
    """Wait for livekit-server to have closed every room (the earlier phases' and rounds'), so
    that no room's end falls into a call's CPU window."""

    async def none() -> bool:
        listed = await rig.lk.call(lambda c: c.room.list_rooms(api.ListRoomsRequest()))
        return not listed.rooms

    try:
        await wait_for(none, timeout, "livekit-server to close its rooms", interval=0.5)
    except AssertionError:
        print(f"  (livekit-server still had rooms after {timeout:g} s)")


async def latency_round(rig: Rig, setup: str, tag: str, args: argparse.Namespace) -> dict[str, Any]:
    sent = await dispatch_many(rig, setup, tag, args.jobs, rate=args.rate, warmup=3)
    stamps = await rig.stamps.wait(tag, args.jobs, 30)
    lat, offer, handler, answer = [], [], [], []
    for s in stamps:
        t = s["meta"]["t"]
        lat.append((s["assigned_at"] - t) * 1000)
        offer.append((s["received_at"] - t) * 1000)
        handler.append((s["accepted_at"] - s["received_at"]) * 1000)
        answer.append((s["assigned_at"] - s["accepted_at"]) * 1000)
    return {
        "setup": setup,
        "jobs": len(stamps),
        "errors": sent["errors"][:3],
        "error_count": len(sent["errors"]),
        "p50_ms": pct(lat, 50),
        "p99_ms": pct(lat, 99),
        "max_ms": max(lat, default=math.nan),
        "offer_p50_ms": pct(offer, 50),
        "handler_p50_ms": pct(handler, 50),
        "answer_p50_ms": pct(answer, 50),
        "create_dispatch_p50_ms": pct([c * 1000 for c in sent["call_s"]], 50),
    }


async def throughput_round(
    rig: Rig, setup: str, tag: str, args: argparse.Namespace
) -> dict[str, Any]:
    new_per_s = math.nan
    if args.new_rooms:  # a dispatch that makes its room, as clients usually dispatch
        sent = await dispatch_many(rig, setup, f"{tag}n", args.new_rooms, in_flight=args.in_flight)
        stamps = await rig.stamps.wait(f"{tag}n", args.new_rooms, 60)
        last = max((s["assigned_at"] for s in stamps), default=math.nan)
        new_per_s = len(stamps) / (last - sent["t0"]) if stamps else 0.0
    await dispatch_many(rig, setup, f"{tag}-warm", 3, in_flight=1)
    await make_rooms(rig, [f"{tag}-lane{k}" for k in range(args.in_flight)])
    await rig.stamps.wait(f"{tag}-warm", 3, 30, kind="entered")
    meter = Meter(rig.groups(setup)).start()
    sent = await dispatch_many(
        rig, setup, tag, args.burst, in_flight=args.in_flight, lane_rooms=True
    )
    stamps = await rig.stamps.wait(tag, args.burst, 60)
    stamps = list({s["job_id"]: s for s in reversed(stamps)}.values())  # a job's first assignment
    # The window ends when every job has run: the workers' cost of starting them is counted.
    entered = await rig.stamps.wait(tag, args.burst, 15, kind="entered")
    entered = list({s["job_id"]: s for s in entered}.values())
    meter.stop()
    last = max((s["assigned_at"] for s in stamps), default=math.nan)
    last_entered = max((s["entered_at"] for s in entered), default=math.nan)
    n = len(stamps)
    return {
        "setup": setup,
        "new_rooms_per_s": new_per_s,
        "jobs": n,
        "entered": len(entered),
        "not_started": n - len(entered),
        "error_count": len(sent["errors"]),
        "errors": sent["errors"][:3],
        "per_s": n / (last - sent["t0"]) if n else 0.0,
        "entered_per_s": len(entered) / (last_entered - sent["t0"]) if entered else 0.0,
        "api_per_s": args.burst / (sent["t_answered"] - sent["t0"]),
        "cpu_ms_per_job": {g: c * 1000 / max(n, 1) for g, c in meter.cpu.items()},
        "seconds": meter.seconds,
    }


async def calls_round(
    rig: Rig, setup: str, tag: str, args: argparse.Namespace, folder: Path
) -> dict[str, Any]:
    url, key, secret, agent_name = rig.target(setup, voice=True)
    groups = rig.groups(setup, voice=True)
    worker_root = groups["workers"][0]
    idle_procs = len(tree([worker_root]))
    folder.mkdir(parents=True, exist_ok=True)
    await no_rooms(rig)
    callers = [
        Caller(rig.lk, f"{tag}-{k}", folder, "--utterances", str(args.utterances))
        for k in range(args.calls)
    ]
    try:
        for c in callers:
            await wait_for(c.joined, 60, "a caller to join its room")
        meter = Meter(groups).start()

        async def inside() -> None:
            client = api.LiveKitAPI(url, key, secret)
            try:
                for k in range(args.calls):
                    if k:
                        # Not at once: livekit-agents 1.8.9 refuses the second of two requests
                        # that reach an idle worker together (it counts the first as a whole
                        # process's load); LiveKit then drops that call, voicefleet retries it.
                        await asyncio.sleep(args.stagger)
                    await client.agent_dispatch.create_dispatch(
                        api.CreateAgentDispatchRequest(agent_name=agent_name, room=f"{tag}-{k}")
                    )
            finally:
                await client.aclose()

        await rig.lk.ns.call(inside)
        reports = [
            await wait_for(c.report, 60 + 10 * args.utterances, "a caller's report")
            for c in callers
        ]
        # The call's end on the agent's side: its job processes have exited (the worker keeps
        # the same number of idle processes as before).
        await asyncio.sleep(0.5)
        try:
            await wait_for(lambda: len(tree([worker_root])) <= idle_procs, 20, "the jobs to end")
        except AssertionError:
            print(f"  ({NAMES[setup]}: the job processes had not all exited after 20 s)")
        meter.stop()
    finally:
        for c in callers:
            c.stop()
    in_path = ["livekit-server", "workers"] + (["voicefleet"] if setup != "a" else [])
    call_cpu = sum(meter.cpu[g] for g in in_path)
    core = meter.seconds * args.calls  # one core for each call over the window
    replies = [u["reply_ms"] for r in reports for u in r["utterances"]]
    return {
        "setup": setup,
        "seconds": meter.seconds,
        "cpu_s": dict(meter.cpu),
        "call_cpu_pct": 100 * call_cpu / core,
        "vf_cpu_pct": 100 * meter.cpu["voicefleet"] / core,
        "vf_share_pct": 100 * meter.cpu["voicefleet"] / call_cpu if setup != "a" else math.nan,
        "lk_cpu_pct": 100 * meter.cpu["livekit-server"] / core,
        "worker_cpu_pct": 100 * meter.cpu["workers"] / core,
        "worker_rss_mb_per_call": (meter.rss_peak["workers"] - meter.rss_before["workers"])
        / 2**20
        / args.calls,
        "worker_rss_mb": meter.rss_peak["workers"] / 2**20,
        "vf_rss_mb": meter.rss_peak["voicefleet"] / 2**20,
        "vf_rss_delta_mb": (meter.rss_peak["voicefleet"] - meter.rss_before["voicefleet"]) / 2**20,
        "lk_rss_delta_mb": (meter.rss_peak["livekit-server"] - meter.rss_before["livekit-server"])
        / 2**20,
        "first_audio_ms": [r["join_to_first_audio_ms"] for r in reports],
        "no_agent": sum(1 for r in reports if r["join_to_first_audio_ms"] is None),
        "unanswered": sum(1 for r in replies if r is None),
        "utterances": len(replies),
        "reply_p50_ms": med([r for r in replies if r is not None]),
    }


# -- the run -----------------------------------------------------------------------------------


@dataclass
class Results:
    args: dict[str, Any]
    latency: list[dict[str, Any]] = field(default_factory=list)
    throughput: list[dict[str, Any]] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)

    def of(self, phase: str, setup: str, key: str) -> list[float]:
        rows: list[dict[str, Any]] = getattr(self, phase)
        return [float(r[key]) for r in rows if r["setup"] == setup]

    def ratios(self, phase: str, key: str, num: str, den: str = "a") -> list[float]:
        """num / den within each round (same minutes of the machine)."""
        a, b = self.of(phase, den, key), self.of(phase, num, key)
        return [y / x for x, y in zip(a, b, strict=False) if x]

    def diffs(self, phase: str, key: str, num: str, den: str = "a") -> list[float]:
        a, b = self.of(phase, den, key), self.of(phase, num, key)
        return [y - x for x, y in zip(a, b, strict=False)]


async def run(args: argparse.Namespace) -> Results:
    work = Path(tempfile.mkdtemp(prefix="voicefleet-side-by-side-"))
    print(f"logs in {work}")
    results = Results(args=vars(args))
    phases = args.phases.split(",")
    began = time.monotonic()
    with livekit_server(work / "livekit", binary=server_binary(), extra_yaml=ROOM_YAML) as lk:
        rig = await start_rig(work, lk, args.bench_workers)
        print(f"rig up in {time.monotonic() - began:.0f} s")
        try:
            # Calls first: the dispatch phases leave hundreds of rooms that livekit-server closes
            # over the next seconds.
            for phase in ("calls", "latency", "throughput"):
                if phase not in phases:
                    continue
                for r in range(args.rounds):
                    for setup in SETUPS:
                        tag = f"{phase[:3]}-{setup}-{r}"
                        if phase == "latency":
                            row = await latency_round(rig, setup, tag, args)
                            print(
                                f"latency    round {r} {NAMES[setup]:8} p50 {row['p50_ms']:6.2f} ms"
                                f"  p99 {row['p99_ms']:6.2f} ms  (offer {row['offer_p50_ms']:.2f},"
                                f" handler {row['handler_p50_ms']:.2f}, answer"
                                f" {row['answer_p50_ms']:.2f}; {row['jobs']} jobs,"
                                f" {row['error_count']} errors)"
                            )
                        elif phase == "throughput":
                            row = await throughput_round(rig, setup, tag, args)
                            cpu = ", ".join(
                                f"{g} {c:.2f}" for g, c in row["cpu_ms_per_job"].items()
                            )
                            print(
                                f"throughput round {r} {NAMES[setup]:8} {row['per_s']:6.0f} jobs/s"
                                f" (new rooms: {row['new_rooms_per_s']:.0f}/s)"
                                f"  (API {row['api_per_s']:.0f}/s; {row['jobs']} jobs,"
                                f" {row['not_started']} not started in 15 s,"
                                f" {row['error_count']} errors; CPU ms/job: {cpu})"
                            )
                        else:
                            row = await calls_round(rig, setup, tag, args, work / "callers")
                            print(
                                f"calls      round {r} {NAMES[setup]:8} call CPU"
                                f" {row['call_cpu_pct']:5.1f} %/call (livekit"
                                f" {row['lk_cpu_pct']:.1f}, worker {row['worker_cpu_pct']:.1f},"
                                f" vf {row['vf_cpu_pct']:.2f}) over {row['seconds']:.1f} s;"
                                f" worker +{row['worker_rss_mb_per_call']:.0f} MB/call, vf RSS"
                                f" {row['vf_rss_mb']:.0f} MB (+{row['vf_rss_delta_mb']:.1f});"
                                f" replies p50 {row['reply_p50_ms']:.0f} ms,"
                                f" {row['unanswered']}/{row['utterances']} unanswered,"
                                f" {row['no_agent']} calls without an agent"
                            )
                        getattr(results, phase).append(row)
                        await asyncio.sleep(args.settle)
        finally:
            stop_rig(rig)
    print(f"\nran {time.monotonic() - began:.0f} s; logs in {work}")
    (work / "results.json").write_text(json.dumps(vars(results), indent=2, default=str))
    return results


def report(res: Results) -> str:
    """The summary as a Markdown table (medians over rounds, min-max in brackets)."""
    lines = [
        "| figure | a: livekit | b: vf | c: gateway | b / a | c / a |",
        "|---|---|---|---|---|---|",
    ]

    def row(label: str, phase: str, key: str, fmt: str = "{:.2f}", ratio: bool = True) -> None:
        cells = [spread(res.of(phase, s, key), fmt) for s in SETUPS]
        ratios = (
            [spread(res.ratios(phase, key, s), "x{:.2f}") for s in ("b", "c")]
            if ratio
            else ["", ""]
        )
        lines.append(f"| {label} | " + " | ".join(cells + ratios) + " |")

    if res.latency:
        rate, jobs = res.args["rate"], res.args["jobs"]
        row(f"dispatch -> assignment p50, {rate:g}/s x {jobs} (ms)", "latency", "p50_ms")
        row("dispatch -> assignment p99 (ms)", "latency", "p99_ms")
        row("  of p50: dispatch -> offer at the worker (ms)", "latency", "offer_p50_ms")
        row("  of p50: worker's request handler (ms)", "latency", "handler_p50_ms")
        row("  of p50: accepted -> assignment at the worker (ms)", "latency", "answer_p50_ms")
        row("  CreateDispatch answered (p50, ms)", "latency", "create_dispatch_p50_ms")
    if res.throughput:
        burst, flight = res.args["burst"], res.args["in_flight"]
        row(
            f"saturation: jobs assigned / s ({burst} jobs, {flight} in flight)",
            "throughput",
            "per_s",
            "{:.0f}",
        )
        row(
            f"  the same, a new room per dispatch ({res.args['new_rooms']} jobs)",
            "throughput",
            "new_rooms_per_s",
            "{:.0f}",
        )
        groups = list(res.throughput[0]["cpu_ms_per_job"])
        for g in groups:
            cells = [
                spread([r["cpu_ms_per_job"][g] for r in res.throughput if r["setup"] == s])
                for s in SETUPS
            ]
            lines.append(f"|   CPU ms per job: {g} | " + " | ".join(cells) + " | | |")
    if res.calls:
        calls, utt = res.args["calls"], res.args["utterances"]
        row(
            f"CPU per call, % of a core ({calls} calls at once, {utt} utterances)",
            "calls",
            "call_cpu_pct",
            "{:.1f}",
        )
        row("  of it: livekit-server", "calls", "lk_cpu_pct", "{:.1f}")
        row("  of it: the agent's worker and job processes", "calls", "worker_cpu_pct", "{:.1f}")
        row(
            "  voicefleet (a: running, not in the path)",
            "calls",
            "vf_cpu_pct",
            "{:.3f}",
            ratio=False,
        )
        row(
            "  voicefleet's share of the call's CPU (%)",
            "calls",
            "vf_share_pct",
            "{:.2f}",
            ratio=False,
        )
        above = {s: above_idle(res, s) for s in ("b", "c")}
        lines.append(
            "|   voicefleet above its idle (x - a in the round), share of the call's CPU (%) | - | "
            + " | ".join(spread(above[s]) for s in ("b", "c"))
            + " | | |"
        )
        row("worker RSS added per call (MB)", "calls", "worker_rss_mb_per_call", "{:.0f}")
        row("voicefleet RSS, peak (MB)", "calls", "vf_rss_mb", "{:.0f}", ratio=False)
        row(
            "voicefleet RSS added during the calls (MB)",
            "calls",
            "vf_rss_delta_mb",
            "{:.1f}",
            ratio=False,
        )
        row("utterance end -> reply, p50 (ms)", "calls", "reply_p50_ms", "{:.0f}")
    return "\n".join(lines)


def above_idle(res: Results, setup: str) -> list[float]:
    """voicefleet's CPU in `setup` less its CPU in the same round's setup a (where it runs, with
    the same workers registered, but is not in the call's path), as a share of the call's CPU."""
    idle = res.of("calls", "a", "vf_cpu_pct")
    busy = res.of("calls", setup, "vf_cpu_pct")
    total = res.of("calls", setup, "call_cpu_pct")
    return [100 * (b - i) / t for i, b, t in zip(idle, busy, total, strict=False) if t]


def goals(res: Results) -> str:
    out = []
    if res.latency:
        d = res.diffs("latency", "p50_ms", "c")
        ok = med(d) <= 1.0
        out.append(
            f"gateway adds to p50 dispatch latency (c - a, per round): {spread(d, '{:+.2f}')} ms"
            f" -> goal <= 1 ms {'met' if ok else 'NOT met'}"
        )
    if res.calls:
        share = res.of("calls", "c", "vf_share_pct")
        above = above_idle(res, "c")
        total = res.ratios("calls", "call_cpu_pct", "c")
        out.append(
            f"gateway's CPU as a share of the call's CPU: {spread(share)} % all of it,"
            f" {spread(above)} % above its idle; whole call's CPU c / a:"
            f" {spread(total, 'x{:.3f}')} -> goal <= 2 %:"
            f" {'met' if med(share) <= 2.0 else 'NOT met'} (all),"
            f" {'met' if med(above) <= 2.0 else 'NOT met'} (above idle)"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--phases", default="latency,throughput,calls")
    parser.add_argument("--rate", type=float, default=10.0, help="latency: dispatches per second")
    parser.add_argument("--jobs", type=int, default=100, help="latency: dispatches per round")
    parser.add_argument("--burst", type=int, default=200, help="throughput: jobs per round")
    parser.add_argument("--in-flight", type=int, default=32, help="throughput: calls at a time")
    parser.add_argument(
        "--new-rooms",
        type=int,
        default=100,
        help="throughput: jobs of the new-room burst (0: none)",
    )
    parser.add_argument("--bench-workers", type=int, default=2, help="stamp_agent workers per side")
    parser.add_argument("--calls", type=int, default=2, help="calls: simultaneous calls")
    parser.add_argument("--utterances", type=int, default=4, help="calls: utterances per call")
    parser.add_argument(
        "--stagger", type=float, default=1.0, help="calls: seconds between dispatches"
    )
    parser.add_argument("--settle", type=float, default=1.0, help="seconds between rounds")
    parser.add_argument("--quick", action="store_true", help="a smoke run: small numbers, 1 round")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.jobs, args.burst, args.in_flight, args.new_rooms = 1, 20, 60, 16, 30
        args.calls, args.utterances, args.settle = 1, 1, 0.5
    res = asyncio.run(run(args))
    print()
    print(report(res))
    print()
    print(goals(res))
    if args.json:
        args.json.write_text(json.dumps(vars(res), indent=2, default=str))


if __name__ == "__main__":
    main()
