"""Soak: calls for a long while under deploys, rollbacks, canaries, scaling and kill -9s.

    .venv/bin/python benchmarks/soak/run.py --minutes 30        # the figures in BENCHMARKS.md
    .venv/bin/python benchmarks/soak/run.py --minutes 3         # a short run
    .venv/bin/python benchmarks/soak/run.py --minutes 1 --replicas 1 --max-replicas 2  # tests/test_soak.py

Starts a real `vf server --dev` (SQLite, the local runtime, a free 127.0.0.1 port, a data dir of
its own), deploys tests/agents/deployable (a plain livekit-agents 1.8.9 worker whose sessions
write `<job id>.started` / `.done` markers; its jobs run in threads, so that a call costs the
2-core machine little) with --replicas instances (2), and for --minutes:

  calls   one explicit dispatch every --interval seconds through livekit-api's
          AgentDispatchService client, each session holding --hold seconds (no media server:
          the sessions do not join rooms)
  chaos   one action after another, in rounds shuffled by a seeded RNG (--seed), --pause
          seconds apart: a rolling deploy of a new version, a rollback, a canary (promoted or
          aborted, by the RNG), a scale to 1 to --max-replicas (3) instances, `kill -9` of a
          ready instance's worker process (its pid from the API), a restart of the server (SIGTERM, then started again on
          the same data dir and port; it adopts the instances left running) and, once, a hard
          `kill -9` of the server followed by a start (it adopts the instances all the same).
          The first round has every kind of action, so that a short run makes each at least once.
          Calls and chaos go on for --minutes, and at least until that first round is done.
  samples every --sample seconds: RSS and open files of the server process, and their sums over
          the agent's instance processes (and their children)

Then it stops calling, waits for every session to end (drain) and checks, from the server's
own records and the agent's markers:

  every session accounted for: each dispatch the server accepted is a job it still knows;
      each job ended; succeeded ones ran their entrypoint to its end (`.done`); one that failed
      names a fault of this run (the worker killed with kill -9, or a server restart during its
      life), and one dispatched again had its worker killed, or the server restarted, during
      its life. Failed sessions whose entrypoint ran to its end anyway (their end never reached
      the server) are counted apart.
  no rollout left progressing (or paused) and none that did not end within --rollout-timeout
  every chaos action did what it was asked (a refusal or a failed command is reported)
  the server's RSS and open files flat: least-squares slope per minute with one intercept per
      server process (restarts reset both), leaving out the first --warmup seconds of each;
      above --max-rss-slope MB/min or --max-fd-slope files/min the run fails, once the
      samples span at least --slope-min-minutes (a short run only reports it)

A JSON report goes to --json (and stdout ends with a readable summary); the exit code is 1 when
any invariant broke.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from livekit import api

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]
from tests.support import DEV_KEY, DEV_SECRET, Server, admin_token  # noqa: E402
from tests.test_deploy import AGENT_SRC, vf  # noqa: E402

AGENT = "soak-agent"
ENDED = ("succeeded", "failed", "terminated")
OPEN_ROLLOUT = ("progressing", "paused")
# Instance statuses whose processes run (their pids are sampled and may be killed).
RUNNING = ("starting", "ready", "retiring", "draining")

FIRST_ROUND = ["deploy", "kill_worker", "canary", "scale", "restart", "rollback", "hard_restart"]
ROUND = ["deploy", "rollback", "canary", "canary", "scale", "kill_worker", "kill_worker", "restart"]


@dataclass
class Fault:
    """One chaos action: what, when, and what it hit."""

    kind: str
    began: float
    ended: float = 0.0
    ok: bool = True
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Sample:
    at: float
    generation: int  # which server process: restarts reset its memory
    server_rss: int
    server_fds: int
    workers_rss: int | None
    workers_fds: int | None
    worker_processes: int | None


class Soak:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.work = work
        self.folder = work / AGENT
        self.markers = work / "markers"
        self.server = Server(work / "data", "--log-level", "warning")
        self.generation = 0
        self.faults: list[Fault] = []
        self.samples: list[Sample] = []
        self.jobs: dict[str, dict[str, Any]] = {}  # job id -> {room, dispatched_at}
        self.refused: list[dict[str, Any]] = []  # dispatches that got no job id
        self.rollouts_late: list[str] = []
        self.replicas = args.replicas
        self.version_counter = 1
        self.stop = asyncio.Event()
        self.down = asyncio.Event()  # set while the server is being restarted
        self.first_round_done = asyncio.Event()  # every kind of action happened once

    # -- plumbing ------------------------------------------------------------------------------

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.server.url + "/api/v1",
            headers={"Authorization": f"Bearer {admin_token()}"},
            timeout=30,
        )

    async def get(self, path: str, **params: Any) -> Any:
        async with self.http() as client:
            r = await client.get(path, params=params)
            r.raise_for_status()
            return r.json()

    async def vf(self, *args: str) -> str:
        """`vf agent ARGS` in the agent's folder (tests.test_deploy.vf, off the event loop)."""
        result = await asyncio.to_thread(vf, self.server, self.folder, *args, ok=False)
        if result.returncode != 0:
            raise RuntimeError(
                f"vf agent {' '.join(args)} exited {result.returncode}: "
                f"{(result.stderr or result.stdout).strip()[-500:]}"
            )
        return result.stdout

    async def status(self) -> dict[str, Any]:
        found: dict[str, Any] = await self.get(f"/agents/{AGENT}")
        return found

    async def rollouts_settled(self, since: float) -> list[dict[str, Any]]:
        """Wait until no rollout of the agent is progressing or paused; the ones since `since`."""
        deadline = time.monotonic() + self.args.rollout_timeout
        while True:
            rollouts = (await self.status())["rollouts"]
            if not any(r["state"] in OPEN_ROLLOUT for r in rollouts):
                return [r for r in rollouts if r["created_at"] >= since - 1]
            if time.monotonic() > deadline:
                stuck = [r["id"] for r in rollouts if r["state"] in OPEN_ROLLOUT]
                self.rollouts_late.extend(stuck)
                raise RuntimeError(
                    f"rollouts {stuck} still open after {self.args.rollout_timeout}s"
                )
            await asyncio.sleep(0.5)

    # -- setup ---------------------------------------------------------------------------------

    async def setup(self) -> None:
        shutil.copytree(AGENT_SRC, self.folder)
        (self.folder / "THREADS").write_text("jobs in threads: cheap sessions\n")
        (self.folder / "VERSION").write_text("1")
        self.markers.mkdir()
        await asyncio.to_thread(self.server.start)
        self.generation = 1
        # Restarts come back on the same port: the clients and the instances keep their url.
        self.server.port = int(self.server.url.rsplit(":", 1)[1])
        await self.vf("create", "--name", AGENT)
        await self.vf("secrets", "set", f"MARKER_DIR={self.markers}")
        await self.vf("scale", str(self.replicas))
        await self.vf("deploy")

    # -- calls ---------------------------------------------------------------------------------

    async def calls(self) -> None:
        n = 0
        lk = api.LiveKitAPI(self.server.url, DEV_KEY, DEV_SECRET)
        try:
            while not self.stop.is_set():
                n += 1
                room = f"soak-{n}"
                hold = round(self.rng.uniform(*self.args.hold), 2)
                began = time.time()
                try:
                    d = await asyncio.wait_for(
                        lk.agent_dispatch.create_dispatch(
                            api.CreateAgentDispatchRequest(
                                agent_name=AGENT, room=room, metadata=json.dumps({"hold": hold})
                            )
                        ),
                        10,
                    )
                    self.jobs[d.state.jobs[0].id] = {"room": room, "dispatched_at": began}
                except Exception as e:  # the server down, or an answer that is not a job
                    self.refused.append(
                        {"room": room, "at": began, "server_down": self.down.is_set(),
                         "error": f"{type(e).__name__}: {e}"[:300]}
                    )  # fmt: skip
                    if isinstance(e, (TimeoutError, OSError)) or "connect" in str(e).lower():
                        # A client whose connection broke with the server: start afresh.
                        await lk.aclose()
                        lk = api.LiveKitAPI(self.server.url, DEV_KEY, DEV_SECRET)
                await asyncio.sleep(max(0.0, began + self.args.interval - time.time()))
        finally:
            await lk.aclose()

    # -- samples -------------------------------------------------------------------------------

    async def sampler(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(Exception):
                await self.sample()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), self.args.sample)

    async def sample(self) -> None:
        if self.down.is_set() or self.server.proc is None:
            return
        generation = self.generation
        proc = psutil.Process(self.server.proc.pid)
        rss, fds = proc.memory_info().rss, proc.num_fds()
        workers_rss = workers_fds = count = None
        with contextlib.suppress(Exception):
            instances = (await self.status())["instances"]
            workers_rss = workers_fds = count = 0
            for i in instances:
                if i["status"] not in RUNNING or i["pid"] <= 0:
                    continue
                with contextlib.suppress(psutil.Error):
                    main = psutil.Process(i["pid"])
                    for p in [main, *main.children(recursive=True)]:
                        with contextlib.suppress(psutil.Error):
                            workers_rss += p.memory_info().rss
                            workers_fds += p.num_fds()
                            count += 1
        if generation == self.generation and not self.down.is_set():
            self.samples.append(
                Sample(time.time(), generation, rss, fds, workers_rss, workers_fds, count)
            )

    # -- chaos ---------------------------------------------------------------------------------

    def plan(self) -> list[str]:
        first = list(FIRST_ROUND)
        self.rng.shuffle(first)
        # A rollback needs an earlier version to go back to: after the first deploy.
        deploy, rollback = first.index("deploy"), first.index("rollback")
        if rollback < deploy:
            first[deploy], first[rollback] = first[rollback], first[deploy]
        return first

    async def chaos(self) -> None:
        actions = self.plan()
        while not self.stop.is_set():
            if not actions:
                self.first_round_done.set()
                actions = list(ROUND)
                self.rng.shuffle(actions)
            kind = actions.pop(0)
            fault = Fault(kind, time.time())
            self.faults.append(fault)
            try:
                await getattr(self, f"do_{kind}")(fault)
            except Exception as e:
                fault.ok = False
                fault.detail["error"] = f"{type(e).__name__}: {e}"[:600]
                print(f"chaos {kind} failed: {fault.detail['error']}", flush=True)
            fault.ended = time.time()
            print(f"{time.strftime('%H:%M:%S')} {kind} {json.dumps(fault.detail)}", flush=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), self.rng.uniform(*self.args.pause))

    def next_source(self) -> str:
        self.version_counter += 1
        (self.folder / "VERSION").write_text(str(self.version_counter))
        return str(self.version_counter)

    async def do_deploy(self, fault: Fault) -> None:
        fault.detail["source"] = self.next_source()
        await self.vf("deploy")
        fault.detail["rollouts"] = await self.rollouts_settled(fault.began)

    async def do_rollback(self, fault: Fault) -> None:
        await self.vf("rollback")
        fault.detail["rollouts"] = await self.rollouts_settled(fault.began)

    async def do_canary(self, fault: Fault) -> None:
        fault.detail["source"] = self.next_source()
        promote = self.rng.random() < 0.5
        fault.detail["asked"] = "promote" if promote else "abort"
        await self.vf("deploy", "--canary", "50")
        # Calls go to both versions for a while, then the canary is promoted or aborted.
        await asyncio.sleep(self.rng.uniform(2, 6))
        await self.vf("canary", "promote" if promote else "abort")
        fault.detail["rollouts"] = await self.rollouts_settled(fault.began)

    async def do_scale(self, fault: Fault) -> None:
        sizes = range(1, self.args.max_replicas + 1)
        self.replicas = self.rng.choice([n for n in sizes if n != self.replicas])
        fault.detail["replicas"] = self.replicas
        await self.vf("scale", str(self.replicas))

    async def do_kill_worker(self, fault: Fault) -> None:
        ready = [i for i in (await self.status())["instances"] if i["status"] == "ready"]
        ready = [i for i in ready if i["pid"] > 0]
        if not ready:
            raise RuntimeError("no ready instance to kill")
        victim = self.rng.choice(ready)
        workers = await self.get("/workers")
        fault.detail.update(
            instance=victim["id"],
            pid=victim["pid"],
            version=victim["version"],
            workers=[w["id"] for w in workers if w["instance"] == victim["id"]],
            jobs=sorted(j for w in workers if w["instance"] == victim["id"] for j in w["jobs"]),
        )
        fault.began = time.time()
        os.kill(victim["pid"], signal.SIGKILL)  # the worker's main process, as a crash would

    async def do_restart(self, fault: Fault, hard: bool = False) -> None:
        assert self.server.proc is not None
        fault.detail["pid"] = self.server.proc.pid
        self.down.set()
        fault.began = time.time()
        try:
            if hard:
                self.server.proc.kill()
                await asyncio.to_thread(self.server.proc.wait)
            else:
                await asyncio.to_thread(self.server.stop, True)  # leave the instances running
            fault.detail["down_at"] = time.time()
            fault.detail["exit_code"] = self.server.proc.returncode
            await asyncio.to_thread(self.server.start, 60)
            self.generation += 1
        finally:
            self.down.clear()
        fault.detail["up_at"] = time.time()
        fault.detail["new_pid"] = self.server.proc.pid
        # What it took back: every instance that ran before is there again, and nothing of the
        # last run's rollouts is left open.
        fault.detail["rollouts"] = await self.rollouts_settled(fault.began)

    async def do_hard_restart(self, fault: Fault) -> None:
        await self.do_restart(fault, hard=True)

    # -- the run -------------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        await self.setup()
        started = time.time()
        print(
            f"soak: server {self.server.url}, data {self.work}; {self.args.minutes} min", flush=True
        )
        tasks = [asyncio.create_task(t) for t in (self.calls(), self.sampler(), self.chaos())]
        await asyncio.sleep(self.args.minutes * 60)
        await self.first_round_done.wait()  # a short run goes on until each fault happened
        self.stop.set()
        await asyncio.gather(*tasks)
        calls_ended = time.time()
        records, drained = await self.drain()
        rollouts = (await self.status())["rollouts"]
        return self.report(records, rollouts, started, calls_ended, drained)

    async def drain(self) -> tuple[dict[str, dict[str, Any] | None], bool]:
        """Wait for every job to end (or --drain-timeout); then each job's record."""
        deadline = time.monotonic() + self.args.drain_timeout
        # A dispatch whose answer was lost (the server went down meanwhile) may have made a job.
        for refused in self.refused:
            for job in await self.get("/jobs", room=refused["room"], limit=10):
                self.jobs.setdefault(
                    job["id"], {"room": refused["room"], "dispatched_at": refused["at"]}
                )
                refused["job_made_anyway"] = job["id"]
        while True:
            records = {
                j["id"]: j for j in await self.get("/jobs", limit=10_000) if j["id"] in self.jobs
            }
            missing = [job_id for job_id in self.jobs if job_id not in records]
            for job_id in missing:  # older than the listing's newest 10,000
                with contextlib.suppress(httpx.HTTPStatusError):
                    records[job_id] = await self.get(f"/jobs/{job_id}")
            open_ = [j for j in records.values() if j["state"] not in ENDED]
            if not open_:
                drained = True
                break
            if time.monotonic() > deadline:
                drained = False
                break
            await asyncio.sleep(1)
        return {job_id: records.get(job_id) for job_id in self.jobs}, drained

    # -- the report ----------------------------------------------------------------------------

    def cause(self, job: dict[str, Any]) -> tuple[str | None, str]:
        """The fault of this run that explains a failed or re-dispatched job, and how."""
        life = (job["created_at"] - 1, (job["ended_at"] or time.time()) + 1)
        during = [
            f
            for f in self.faults
            if life[0] <= f.began <= life[1] or (f.began <= life[0] <= f.ended)
        ]
        error = job["error"] or ""
        killed = {
            w: f
            for f in self.faults
            if f.kind == "kill_worker"
            for w in f.detail.get("workers", [])
        }
        named = re.match(r"worker (\S+) ", error)
        if named and named.group(1) in killed:
            return "kill_worker", f"names worker {named.group(1)}, killed with kill -9"
        if error.startswith("voicefleet restarted"):
            restarts = [f for f in during if f.kind in ("restart", "hard_restart")]
            if restarts:
                return restarts[0].kind, "the server restarted during the session"
        if error.startswith("job process killed by SIGKILL"):
            kills = [f for f in during if f.kind == "kill_worker"]
            if kills:
                return "kill_worker", "its process was killed with its worker"
        if job["state"] == "succeeded" and job["redispatches"]:
            # Dispatched again, then ran to its end: its worker died (kill -9), or the server
            # went away under it.
            faults = [f for f in during if f.kind in ("kill_worker", "hard_restart", "restart")]
            if any(
                f.kind == "kill_worker" and job["id"] in f.detail.get("jobs", []) for f in faults
            ):
                return "kill_worker", "it ran on the worker killed with kill -9, then elsewhere"
            if faults:
                return faults[0].kind, f"dispatched again after the {faults[0].kind} during it"
        return None, "no fault of this run explains it"

    def report(
        self,
        records: dict[str, dict[str, Any] | None],
        rollouts: list[dict[str, Any]],
        started: float,
        calls_ended: float,
        drained: bool,
    ) -> dict[str, Any]:
        outcomes: Counter[str] = Counter()
        violations: list[str] = []
        explained: Counter[str] = Counter()
        redispatched = 0
        ran_to_end: list[dict[str, Any]] = []
        for job_id, job in records.items():
            if job is None:
                outcomes["lost"] += 1
                violations.append(
                    f"session {job_id} ({self.jobs[job_id]['room']}) lost: the server has no record of it"
                )
                continue
            outcomes[job["state"]] += 1
            redispatched += job["redispatches"] > 0
            if job["state"] not in ENDED:
                violations.append(f"session {job_id} stuck {job['state']} after the drain")
            elif job["state"] == "succeeded":
                if not (self.markers / f"{job_id}.done").exists():
                    violations.append(
                        f"session {job_id} succeeded but its entrypoint never finished"
                    )
                if job["redispatches"]:
                    kind, why = self.cause(job)
                    if kind is None:
                        violations.append(f"session {job_id} was dispatched again: {why}")
                    else:
                        explained[f"redispatched after {kind}"] += 1
            else:
                kind, why = self.cause(job)
                if kind is None:
                    violations.append(f"session {job_id} {job['state']}: {job['error']!r}: {why}")
                else:
                    explained[f"{job['state']} by {kind}"] += 1
                if (self.markers / f"{job_id}.done").exists():
                    # Its entrypoint ran to its end, yet its end never reached the server (its
                    # worker exited, or was killed, before it could report it).
                    ran_to_end.append({"job": job_id, "state": job["state"], "error": job["error"]})
        if not drained:
            violations.append(
                f"sessions still open {self.args.drain_timeout}s after the calls stopped"
            )
        for fault in self.faults:
            if not fault.ok:
                violations.append(
                    f"chaos {fault.kind} at {fault.began - started:.0f}s failed: {fault.detail.get('error')}"
                )
        violations += [f"rollout {r} did not settle" for r in self.rollouts_late]
        for r in rollouts:
            if r["state"] in OPEN_ROLLOUT:
                violations.append(f"rollout {r['id']} ({r['to_version']}) left {r['state']}")
        faults_count = Counter(f.kind for f in self.faults if f.ok)
        trend = self.trends()
        gate = trend["server"]
        if gate["span_minutes"] >= self.args.slope_min_minutes:
            if (
                gate["rss_mb_per_min"] is not None
                and gate["rss_mb_per_min"] > self.args.max_rss_slope
            ):
                violations.append(
                    f"server RSS grows {gate['rss_mb_per_min']:.3f} MB/min (limit {self.args.max_rss_slope})"
                )
            if gate["fds_per_min"] is not None and gate["fds_per_min"] > self.args.max_fd_slope:
                violations.append(
                    f"server open files grow {gate['fds_per_min']:.3f}/min (limit {self.args.max_fd_slope})"
                )
            trend["gated"] = True
        else:
            trend["gated"] = False
        return {
            "command": " ".join(sys.argv),
            "seed": self.args.seed,
            "minutes": self.args.minutes,
            "calls_minutes": round((calls_ended - started) / 60, 2),
            "sessions": len(records),
            "outcomes": dict(outcomes),
            "redispatched": redispatched,
            "explained": dict(explained),
            "failed_after_running_to_end": ran_to_end,
            "refused": len(self.refused),
            "refused_while_server_down": sum(r["server_down"] for r in self.refused),
            "refused_errors": dict(
                Counter(
                    re.sub(r"soak-\d+", "soak-N", r["error"])[:120] for r in self.refused
                ).most_common(5)
            ),
            "faults": dict(faults_count),
            # Every rollout the chaos made, as it ended (the server lists only its latest).
            "rollouts": dict(
                Counter(
                    f"{r['strategy']} {r['state']}"
                    for f in self.faults
                    for r in f.detail.get("rollouts", [])
                )
            ),
            "faults_failed": sum(not f.ok for f in self.faults),
            "fault_log": [asdict(f) for f in self.faults],
            "trends": trend,
            "samples": len(self.samples),
            "violations": violations,
            "ok": not violations,
            "work": str(self.work),
        }

    def trends(self) -> dict[str, Any]:
        warm = self.args.warmup
        first_seen: dict[int, float] = {}
        for s in self.samples:
            first_seen.setdefault(s.generation, s.at)
        kept = [s for s in self.samples if s.at - first_seen[s.generation] >= warm]

        def pooled(values: list[tuple[int, float, float]]) -> tuple[float | None, float]:
            """Least-squares slope per minute with one intercept per server process: centre
            time and value within each generation, then a line through the origin."""
            groups: dict[int, list[tuple[float, float]]] = {}
            for g, t, v in values:
                groups.setdefault(g, []).append((t, v))
            xs: list[float] = []
            ys: list[float] = []
            span = 0.0
            for points in groups.values():
                if len(points) < 2:
                    continue
                mt = statistics.fmean(t for t, _ in points)
                mv = statistics.fmean(v for _, v in points)
                xs += [(t - mt) / 60 for t, _ in points]
                ys += [v - mv for _, v in points]
                span += (points[-1][0] - points[0][0]) / 60
            if len(xs) < 3 or not any(xs):
                return None, span
            return statistics.linear_regression(xs, ys, proportional=True).slope, span

        rss, span = pooled([(s.generation, s.at, s.server_rss / 2**20) for s in kept])
        fds, _ = pooled([(s.generation, s.at, s.server_fds) for s in kept])
        w = [s for s in self.samples if s.workers_rss is not None]

        def plain(values: list[tuple[float, float]]) -> float | None:
            if len(values) < 3:
                return None
            return statistics.linear_regression(
                [t / 60 for t, _ in values], [v for _, v in values]
            ).slope

        return {
            "server": {
                "rss_mb_per_min": rss,
                "fds_per_min": fds,
                "span_minutes": round(span, 2),
                "generations": len(first_seen),
                "rss_mb_first_last": [
                    round(self.samples[0].server_rss / 2**20, 1),
                    round(self.samples[-1].server_rss / 2**20, 1),
                ]
                if self.samples
                else None,
                "rss_mb_max": round(
                    max((s.server_rss for s in self.samples), default=0) / 2**20, 1
                ),
                "fds_first_last": [self.samples[0].server_fds, self.samples[-1].server_fds]
                if self.samples
                else None,
                "fds_max": max((s.server_fds for s in self.samples), default=0),
            },
            "workers": {
                "rss_mb_per_min": plain(
                    [(s.at, s.workers_rss / 2**20) for s in w if s.workers_rss is not None]
                ),
                "fds_per_min": plain(
                    [(s.at, float(s.workers_fds)) for s in w if s.workers_fds is not None]
                ),
                "rss_mb_max": round(max((s.workers_rss or 0 for s in w), default=0) / 2**20, 1),
                "processes_max": max((s.worker_processes or 0 for s in w), default=0),
            },
            "warmup_s": warm,
        }

    async def close(self) -> None:
        """Stop the server and every instance it ran or adopted."""
        pids: list[int] = []
        with contextlib.suppress(Exception):
            pids = [i["pid"] for i in (await self.status())["instances"] if i["pid"] > 0]
        await asyncio.to_thread(self.server.stop)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


def summary(report: dict[str, Any]) -> str:
    server, workers = report["trends"]["server"], report["trends"]["workers"]

    def num(x: float | None, digits: int = 3) -> str:
        return "n/a" if x is None else f"{x:+.{digits}f}"

    lines = [
        f"soak: {report['calls_minutes']} min of calls, seed {report['seed']}",
        f"sessions     {report['sessions']}: {report['outcomes']}",
        f"  redispatched {report['redispatched']}; failures and redispatches explained: {report['explained']}",
        f"  failed though their entrypoint ran to its end: {len(report['failed_after_running_to_end'])}",
        f"  dispatches refused {report['refused']} ({report['refused_while_server_down']} while the server was down)",
        f"faults       {report['faults']} ({report['faults_failed']} actions failed)",
        f"rollouts     {report['rollouts']}",
        f"server       RSS {num(server['rss_mb_per_min'])} MB/min, open files {num(server['fds_per_min'])}/min"
        f" over {server['span_minutes']} min of {server['generations']} processes"
        f" (max {server['rss_mb_max']} MB, {server['fds_max']} files;"
        f" {'gated' if report['trends']['gated'] else 'not gated: too short'})",
        f"workers      RSS {num(workers['rss_mb_per_min'])} MB/min, open files {num(workers['fds_per_min'])}/min"
        f" (max {workers['rss_mb_max']} MB over {workers['processes_max']} processes)",
    ]
    if report["violations"]:
        lines.append(f"FAILED: {len(report['violations'])} invariant(s) broken:")
        lines += [f"  - {v}" for v in report["violations"][:50]]
    else:
        lines.append("OK: every session accounted for, no rollout left open")
    return "\n".join(lines)


def pair(text: str) -> tuple[float, float]:
    low, _, high = text.partition(",")
    return float(low), float(high or low)


async def main(args: argparse.Namespace) -> int:
    if args.pause is None:
        args.pause = (1.0, 3.0) if args.minutes < 10 else (5.0, 20.0)
    work = Path(tempfile.mkdtemp(prefix="vf-soak-"))
    soak = Soak(args, work)
    try:
        report = await soak.run()
    finally:
        await soak.close()
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.write_text(text)
    print(summary(report), flush=True)
    if not args.keep and report["ok"]:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"kept {work} (server log: {work / 'data' / 'server.log'})")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=30, help="how long calls go on")
    parser.add_argument("--replicas", type=int, default=2, help="instances at the start")
    parser.add_argument("--max-replicas", type=int, default=3, help="scaling picks 1 to this")
    parser.add_argument("--seed", type=int, default=1, help="the chaos schedule's RNG seed")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between calls")
    parser.add_argument(
        "--hold", type=pair, default=(2.0, 5.0), help="a session's length range, s (LOW,HIGH)"
    )
    parser.add_argument(
        "--pause",
        type=pair,
        help="seconds between chaos actions (LOW,HIGH); default 5,20, or 1,3 for runs under 10 min",
    )
    parser.add_argument(
        "--sample", type=float, default=3.0, help="seconds between RSS/open-file samples"
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=60.0,
        help="seconds after each server start left out of the slope",
    )
    parser.add_argument("--max-rss-slope", type=float, default=1.0, help="server RSS limit, MB/min")
    parser.add_argument(
        "--max-fd-slope", type=float, default=1.0, help="server open files limit, per min"
    )
    parser.add_argument(
        "--slope-min-minutes",
        type=float,
        default=10.0,
        help="samples needed before the slope limits apply",
    )
    parser.add_argument("--rollout-timeout", type=float, default=240.0)
    parser.add_argument("--drain-timeout", type=float, default=180.0)
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument(
        "--keep", action="store_true", help="keep the data dir and logs (kept anyway on failure)"
    )
    sys.exit(asyncio.run(main(parser.parse_args())))
