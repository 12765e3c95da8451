"""A LiveKit agent that needs no LiveKit SFU: a stand-in for a voice agent's session.

Per session it makes 20 ms frames of a 440 Hz tone at real-time pace, measures their level,
and ends with ctx.shutdown() after SESSION_SECONDS (or the job metadata's {"seconds": N}).
Nothing in it knows about voicefleet: `python agent.py start` against any LiveKit server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time

from livekit.agents import JobContext, WorkerOptions, cli

log = logging.getLogger("hello-agent")

SAMPLE_RATE = 16_000
FRAME_MS = 20


def tone_frame(start: int, n: int, freq: float = 440.0) -> list[float]:
    return [0.3 * math.sin(2 * math.pi * freq * (start + i) / SAMPLE_RATE) for i in range(n)]


def rms(frame: list[float]) -> float:
    return math.sqrt(sum(x * x for x in frame) / len(frame))


async def entrypoint(ctx: JobContext) -> None:
    meta = json.loads(ctx.job.metadata or "{}")
    seconds = float(meta.get("seconds", os.environ.get("SESSION_SECONDS", "2")))
    per_frame = SAMPLE_RATE * FRAME_MS // 1000
    frames, level = 0, 0.0
    began = time.monotonic()
    while time.monotonic() - began < seconds:
        level = max(level, rms(tone_frame(frames * per_frame, per_frame)))
        frames += 1
        # Real-time pace: frame n is due n * 20 ms after the start.
        await asyncio.sleep(max(0.0, began + frames * FRAME_MS / 1000 - time.monotonic()))
    log.info("session done", extra={"room": ctx.job.room.name, "frames": frames, "peak_rms": level})
    ctx.shutdown("session complete")


if __name__ == "__main__":
    cli.run_app(
        WorkerOptions(
            entrypoint_fnc=entrypoint,
            agent_name=os.environ.get("LIVEKIT_AGENT_NAME", "hello"),
            num_idle_processes=1,
            port=0,
        )
    )
