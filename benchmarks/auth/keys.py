"""What checking a voicefleet API key costs a control-API request, next to the project's token.

    .venv/bin/python benchmarks/auth/keys.py [--requests 2000 --rounds 3]

Starts `vf server --dev` (SQLite, log level warning) in its own process, makes a viewer key with
`vf server keys create` on its data dir, then sends `GET /api/v1/routing` (no store read of
its own, so the time is mostly HTTP and authentication) one at a time over one keep-alive
connection, in alternating rounds of
  token   a JWT signed with the project's key, with the agent admin grant (verified: HS256);
  key     `Authorization: Bearer vfk_<id>.<secret>` (HMAC-SHA256 under the pepper, and the
          key's row read from the store, on every request).
Prints p50 and p99 latency of each, per round, in milliseconds. Then, in this process, the
cost of the check alone: `Keys.authenticate` on a SQLite store (the HMAC and the row read)
against `tokens.verify` of the project's token, mean microseconds over --requests calls.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]
from tests.support import DEV_SECRET, Server, admin_token  # noqa: E402
from voicefleet.control.access import Keys  # noqa: E402
from voicefleet.protocol import tokens  # noqa: E402
from voicefleet.store.db import open_engine  # noqa: E402
from voicefleet.store.repo import Repo  # noqa: E402


async def in_process(folder: str, n: int) -> None:
    engine = await open_engine(f"sqlite+aiosqlite:///{folder}/bench.db")
    try:
        keys = Keys(Repo(engine), b"p" * 32)
        _, key = await keys.create("viewer")
        await keys.authenticate(key)
        start = time.perf_counter()
        for _ in range(n):
            await keys.authenticate(key)
        key_us = (time.perf_counter() - start) / n * 1e6
    finally:
        await engine.dispose()
    token = admin_token()
    start = time.perf_counter()
    for _ in range(n):
        tokens.verify(token, lambda _: DEV_SECRET)
    token_us = (time.perf_counter() - start) / n * 1e6
    print(f"in process: key check {key_us:.0f} us, token check {token_us:.0f} us ({n} each)")


def timings(server: Server, token: str, n: int) -> list[float]:
    out = []
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
    ) as http:
        http.get("/api/v1/routing").raise_for_status()  # the connection, warm
        for _ in range(n):
            start = time.perf_counter()
            http.get("/api/v1/routing").raise_for_status()
            out.append((time.perf_counter() - start) * 1000)
    return out


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp), "--log-level", "warning").start()
        try:
            made = subprocess.run(
                [sys.executable, "-m", "voicefleet", "server", "keys", "create", "--role",
                 "viewer", "--data-dir", tmp, "--json"],
                env={**os.environ, "VOICEFLEET_API_KEY": ""},
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            key = json.loads(made.stdout)["token"]
            for round_ in range(1, args.rounds + 1):
                for name, token in (("token", admin_token()), ("key", key)):
                    t = timings(server, token, args.requests)
                    print(
                        f"round {round_} {name:5}  p50 {pct(t, 50):.2f} ms  p99 {pct(t, 99):.2f} ms"
                        f"  ({len(t)} requests)"
                    )
        finally:
            server.stop()
        asyncio.run(in_process(tmp, args.requests))


if __name__ == "__main__":
    main()
