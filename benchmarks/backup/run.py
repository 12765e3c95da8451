"""Backup benchmark: how long `vf server backup` takes on a store of many sessions, how big the
archive is, and whether the server's writes wait for it.

    .venv/bin/python benchmarks/backup/run.py [--sessions 500000 --writes-for 20]

Makes a data dir whose store holds --sessions finished sessions (the jobs table, the store's
largest by far: rows as the recorder writes them, inserted directly), starts `vf server --dev`
(SQLite, log level warning) on it, creates one agent, then sets a feature flag over and over
(`PUT /api/v1/agents/{name}/flags/{key}`: one transaction committed before the answer) for
--writes-for seconds with no backup, then again while `vf server backup` runs (back to back,
as many times as fit). Reports each write's latency (p50, p99, max) in both phases, the
backups' wall time, the store's and the archive's size.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from sqlalchemy import create_engine, insert  # noqa: E402

from tests.support import Server, admin_token  # noqa: E402
from voicefleet.store.db import open_engine  # noqa: E402
from voicefleet.store.models import JOBS  # noqa: E402


def fill(data_dir: Path, sessions: int) -> None:
    async def schema() -> None:
        engine = await open_engine(f"sqlite+aiosqlite:///{data_dir / 'voicefleet.db'}")
        await engine.dispose()

    asyncio.run(schema())
    engine = create_engine(f"sqlite:///{data_dir / 'voicefleet.db'}")
    now = time.time()
    with engine.begin() as conn:
        for start in range(0, sessions, 10_000):
            rows = [
                {
                    "id": f"AJ_bench{n:012d}",
                    "dispatch_id": f"AD_bench{n:012d}",
                    "agent_name": "bench",
                    "room": f"room-{n}",
                    "room_sid": f"RM_{n:012d}",
                    "metadata": '{"caller": "+15550100"}',
                    "state": "succeeded",
                    "worker_id": "AW_bench",
                    "agent_id": "CA_bench",
                    "version": "v1",
                    "instance": "bench-v1-0",
                    "participant_identity": f"agent-AJ_{n}",
                    "created_at": now - n,
                    "assigned_at": now - n,
                    "started_at": now - n,
                    "ended_at": now - n + 60,
                }
                for n in range(start, min(start + 10_000, sessions))
            ]
            conn.execute(insert(JOBS), rows)
    engine.dispose()


def percentiles(xs: list[float]) -> str:
    xs = sorted(xs)
    p99 = xs[min(len(xs) - 1, int(len(xs) * 0.99))]
    return (
        f"n={len(xs)} p50 {statistics.median(xs) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
        f"max {xs[-1] * 1000:.1f} ms"
    )


def writes(url: str, seconds: float) -> list[float]:
    headers = {"Authorization": f"Bearer {admin_token()}"}
    took = []
    with httpx.Client(base_url=url + "/api/v1", headers=headers, timeout=60) as client:
        end, n = time.monotonic() + seconds, 0
        while time.monotonic() < end:
            n += 1
            t0 = time.perf_counter()
            r = client.put(
                "/agents/bench/flags/greeting", json={"type": "string", "value": f"hello {n}"}
            )
            took.append(time.perf_counter() - t0)
            r.raise_for_status()
    return took


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=500_000)
    parser.add_argument("--writes-for", type=float, default=20.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vf-backup-bench-") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        t0 = time.monotonic()
        fill(data, args.sessions)
        db_mb = (data / "voicefleet.db").stat().st_size / 2**20
        print(f"store: {args.sessions} sessions, {db_mb:.0f} MB ({time.monotonic() - t0:.0f} s)")
        server = Server(data, "--log-level", "warning").start(timeout=120)
        try:
            headers = {"Authorization": f"Bearer {admin_token()}"}
            httpx.post(
                server.url + "/api/v1/agents", json={"name": "bench"}, headers=headers
            ).raise_for_status()
            print("writes, no backup:     ", percentiles(writes(server.url, args.writes_for)))
            durations: list[float] = []
            stop = threading.Event()
            archive = Path(tmp) / "backup.tar.gz"

            def back_up() -> None:
                while not stop.is_set():
                    t = time.monotonic()
                    subprocess.run(
                        [sys.executable, "-m", "voicefleet", "server", "backup", str(archive),
                         "--data-dir", str(data)],
                        check=True, capture_output=True,
                    )  # fmt: skip
                    durations.append(time.monotonic() - t)

            thread = threading.Thread(target=back_up)
            thread.start()
            during = writes(server.url, args.writes_for)
            stop.set()
            thread.join()
            print("writes, during backups:", percentiles(during))
            print(
                f"backup: {len(durations)} run(s), wall {min(durations):.1f}-"
                f"{max(durations):.1f} s (process start included), archive "
                f"{archive.stat().st_size / 2**20:.1f} MB"
            )
        finally:
            server.stop()


if __name__ == "__main__":
    main()
