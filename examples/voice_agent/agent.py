"""A voice agent: joins its room, listens to the caller, answers every utterance with audio.

In a real room (a LiveKit server at the job's url) it connects, greets the caller with a short
660 Hz tone, subscribes to the caller's microphone, finds where the caller speaks with Silero's
VAD (livekit-plugins-silero; its ONNX model ships inside the wheel, so nothing is downloaded),
and answers each utterance, once it ends, with 0.8 s of 440 Hz tone (the stand-in for
synthesized speech) on a track it publishes. The job ends when the caller leaves. A smoke
test's session (job metadata {"smoke": true}) joins, greets nobody and ends.

Without a real room (a worker of a dispatch server that has no LiveKit server behind it, e.g.
`vf demo`), a session is synthetic: it listens to bundled speech (speech.wav, 16 kHz mono) in
20 ms frames at real-time pace, finds utterances with an energy detector, "answers" each with
tone frames it does not send anywhere, and after SESSION_SECONDS (or the job metadata's
{"seconds": N}) ends with ctx.shutdown(). Nothing in it knows voicefleet.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import wave
from pathlib import Path

import numpy as np
from livekit import rtc
from livekit.agents import AutoSubscribe, JobContext, JobProcess, WorkerOptions, cli, vad
from livekit.plugins import silero

log = logging.getLogger("voice-agent")

RATE = 16_000
FRAME = RATE // 50  # 20 ms
SPEECH = Path(__file__).with_name("speech.wav")

OUT_RATE = 48_000
OUT_FRAME = OUT_RATE // 100  # 10 ms
GREETING = (660.0, 0.5)  # Hz, seconds
ANSWER = (440.0, 0.8)


def prewarm(proc: JobProcess) -> None:
    # Loaded once per job process, before any job: the first answer does not wait for it.
    proc.userdata["vad"] = silero.VAD.load()


# -- a real call ---------------------------------------------------------------------------


def reply_frames(freq: float, seconds: float) -> list[rtc.AudioFrame]:
    """A tone in 10 ms frames, with 5 ms fades so that it starts and stops without a click."""
    n = int(OUT_RATE * seconds)
    t = np.arange(n) / OUT_RATE
    wave_ = 0.3 * 32767 * np.sin(2 * np.pi * freq * t)
    fade = np.minimum(1.0, np.minimum(np.arange(n), n - 1 - np.arange(n)) / (OUT_RATE * 0.005))
    pcm = (wave_ * fade).astype(np.int16)
    return [
        rtc.AudioFrame(pcm[i : i + OUT_FRAME].tobytes(), OUT_RATE, 1, OUT_FRAME)
        for i in range(0, n - OUT_FRAME + 1, OUT_FRAME)
    ]


def has_livekit_room(url: str, token: str) -> bool:
    """Whether `url` is a LiveKit server that accepts `token` for the room: asked as LiveKit's
    own client SDKs do after a failed join (`/rtc/validate`). A dispatch server without a
    LiveKit server behind it gives no room url, and livekit-agents then uses the url the worker
    registered with, which is not a LiveKit server and answers 404."""
    http = url.replace("wss://", "https://", 1).replace("ws://", "http://", 1).rstrip("/")
    query = urllib.parse.urlencode({"access_token": token})
    try:
        with urllib.request.urlopen(f"{http}/rtc/validate?{query}", timeout=10) as r:
            return bool(r.status == 200)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return False
        raise


async def call(ctx: JobContext) -> None:
    """Greet, then answer every utterance of the caller, until the caller leaves."""
    detector: vad.VAD = ctx.proc.userdata.get("vad") or silero.VAD.load()
    await ctx.connect(auto_subscribe=AutoSubscribe.AUDIO_ONLY)
    source = rtc.AudioSource(OUT_RATE, 1)
    track = rtc.LocalAudioTrack.create_audio_track("answer", source)
    await ctx.room.local_participant.publish_track(
        track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
    )
    if json.loads(ctx.job.metadata or "{}").get("smoke"):
        # A smoke test's session (a blue-green deploy checks the new version with one): nobody
        # will come. Joining and speaking is the check; then it ends.
        for frame in reply_frames(*GREETING):
            await source.capture_frame(frame)
        ctx.shutdown("smoke test: joined and spoke")
        return
    left = asyncio.Event()
    ctx.room.on("disconnected", lambda *_: left.set())
    arrived = asyncio.ensure_future(ctx.wait_for_participant())
    ended = asyncio.ensure_future(left.wait())
    await asyncio.wait([arrived, ended], return_when=asyncio.FIRST_COMPLETED)
    ended.cancel()
    if not arrived.done():  # the room went before anyone came
        arrived.cancel()
        ctx.shutdown("nobody came")
        return
    caller = arrived.result()

    def gone(who: rtc.RemoteParticipant) -> None:
        if who.identity == caller.identity:
            left.set()

    ctx.room.on("participant_disconnected", gone)
    if caller.identity not in ctx.room.remote_participants:
        left.set()  # it left while we looked

    answers: asyncio.Queue[list[rtc.AudioFrame]] = asyncio.Queue()
    answer = reply_frames(*ANSWER)
    answers.put_nowait(reply_frames(*GREETING))
    utterances = 0

    async def speak() -> None:
        # The source queues up to a second and sends in real time: a whole answer is handed
        # over at once, so this loop's scheduling never makes a gap in it.
        while True:
            for frame in await answers.get():
                await source.capture_frame(frame)

    async def listen() -> None:
        nonlocal utterances
        stream = vad_stream = None
        try:
            stream = rtc.AudioStream.from_participant(
                participant=caller,
                track_source=rtc.TrackSource.SOURCE_MICROPHONE,
                sample_rate=RATE,
                num_channels=1,
            )
            vad_stream = detector.stream()

            async def feed() -> None:
                async for event in stream:
                    vad_stream.push_frame(event.frame)

            feeding = asyncio.create_task(feed())
            try:
                async for event in vad_stream:
                    if event.type == vad.VADEventType.END_OF_SPEECH:
                        utterances += 1
                        answers.put_nowait(answer)
            finally:
                feeding.cancel()
        finally:
            if vad_stream is not None:
                await vad_stream.aclose()
            if stream is not None:
                await stream.aclose()

    tasks = [asyncio.create_task(speak()), asyncio.create_task(listen())]
    try:
        await left.wait()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await source.aclose()
    log.info(
        "call done",
        extra={"room": ctx.room.name, "caller": caller.identity, "utterances": utterances},
    )
    ctx.shutdown("caller left")


# -- a synthetic session (no LiveKit server) -------------------------------------------------


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


async def synthetic(ctx: JobContext) -> None:
    meta = json.loads(ctx.job.metadata or "{}")
    seconds = float(meta.get("seconds", os.environ.get("SESSION_SECONDS", "5")))
    speech = load_speech()
    detector = EnergyVAD()
    utterances = replies = late = frames = 0
    reply_left = 0
    began = time.monotonic()
    while time.monotonic() - began < seconds:
        offset = (frames * FRAME) % (len(speech) - FRAME)
        event = detector.push(speech[offset : offset + FRAME])
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


async def entrypoint(ctx: JobContext) -> None:
    info = ctx._info  # the room's url and token, as the worker got them with the job
    if await asyncio.to_thread(has_livekit_room, info.url, info.token):
        await call(ctx)
    else:
        await synthetic(ctx)


def load(worker: object) -> float:
    # Load by sessions, not CPU (the default): a worker of a voice agent is full at a number of
    # calls, and CPU-based load makes serving workers report full while new instances start
    # on a small machine. MAX_SESSIONS calls make it full.
    sessions = len(worker.active_jobs)  # type: ignore[attr-defined]
    return min(sessions / int(os.environ.get("MAX_SESSIONS", "25")), 1.0)


if __name__ == "__main__":
    cli.run_app(
        WorkerOptions(
            entrypoint_fnc=entrypoint,
            prewarm_fnc=prewarm,
            load_fnc=load,
            load_threshold=0.99,
            num_idle_processes=1,
        )
    )
