"""A synthetic voice agent: a real LiveKit agent that needs no LiveKit SFU.

Per session it listens to bundled speech (speech.wav, 16 kHz mono) in 20 ms frames at real-time
pace, finds where the caller speaks with an energy voice-activity detector, answers every
utterance with a 440 Hz tone (the stand-in for synthesized speech), and after SESSION_SECONDS
(or the job metadata's {"seconds": N}) ends with ctx.shutdown(). Nothing in it knows voicefleet.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import wave
from pathlib import Path

import numpy as np
from livekit.agents import JobContext, WorkerOptions, cli

log = logging.getLogger("voice-agent")

RATE = 16_000
FRAME = RATE // 50  # 20 ms
SPEECH = Path(__file__).with_name("speech.wav")


def load_speech() -> np.ndarray:
    with wave.open(str(SPEECH)) as w:
        assert w.getframerate() == RATE and w.getnchannels() == 1
        return np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32)


class EnergyVAD:
    """Speech when a frame's level is well above the noise floor; 300 ms of quiet ends it."""

    def __init__(self, threshold_db: float = -35.0, hangover_frames: int = 15) -> None:
        self.threshold = 10 ** (threshold_db / 20) * 32768
        self.hangover = hangover_frames
        self.quiet = 0
        self.speaking = False

    def push(self, frame: np.ndarray) -> str | None:
        """'start' or 'end' when an utterance starts or ends, else None."""
        loud = float(np.sqrt(np.mean(frame * frame))) > self.threshold
        if loud:
            self.quiet = 0
            if not self.speaking:
                self.speaking = True
                return "start"
        elif self.speaking:
            self.quiet += 1
            if self.quiet >= self.hangover:
                self.speaking = False
                return "end"
        return None


def tone(frames: int, start: int = 0, freq: float = 440.0) -> np.ndarray:
    t = (np.arange(frames * FRAME) + start) / RATE
    return (0.3 * 32767 * np.sin(2 * np.pi * freq * t)).astype(np.int16)


async def entrypoint(ctx: JobContext) -> None:
    meta = json.loads(ctx.job.metadata or "{}")
    seconds = float(meta.get("seconds", os.environ.get("SESSION_SECONDS", "5")))
    speech = load_speech()
    vad = EnergyVAD()
    utterances = replies = late = frames = 0
    reply_left = 0
    began = time.monotonic()
    while time.monotonic() - began < seconds:
        offset = (frames * FRAME) % (len(speech) - FRAME)
        event = vad.push(speech[offset : offset + FRAME])
        if event == "start":
            utterances += 1
        elif event == "end":
            replies += 1
            reply_left = 25  # answer with 0.5 s of tone
        if reply_left:
            tone(1, start=frames * FRAME)  # the frame we would publish
            reply_left -= 1
        frames += 1
        # Real-time pace: frame n is due n * 20 ms after the start.
        delay = began + frames * 0.02 - time.monotonic()
        if delay < -0.02:
            late += 1
        await asyncio.sleep(max(0.0, delay))
    log.info(
        "session done",
        extra={
            "room": ctx.job.room.name,
            "frames": frames,
            "utterances": utterances,
            "replies": replies,
            "late_frames": late,
            "greeting": os.environ.get("GREETING", ""),
        },
    )
    ctx.shutdown("session complete")


def load(worker: object) -> float:
    # Load by sessions, not CPU (the default): a worker of a voice agent is full at a number of
    # calls, and CPU-based load makes serving workers report full while new instances start
    # on a small machine. MAX_SESSIONS calls make it full.
    sessions = len(worker.active_jobs)  # type: ignore[attr-defined]
    return min(sessions / int(os.environ.get("MAX_SESSIONS", "25")), 1.0)


if __name__ == "__main__":
    cli.run_app(
        WorkerOptions(
            entrypoint_fnc=entrypoint, load_fnc=load, load_threshold=0.99, num_idle_processes=1
        )
    )
