"""A simulated caller: joins a LiveKit room, speaks from a WAV at real-time pace, records what it
hears, and reports how the agent in the room answered.

    python -m tests.caller --room call-1 --report call-1.json \
        [--url ws://127.0.0.1:7880] [--wav examples/voice_agent/speech.wav] [--utterances 3]

The url, API key and secret come from LIVEKIT_URL / LIVEKIT_API_KEY / LIVEKIT_API_SECRET unless
given; the caller mints its own participant token. Run it as a module from the checkout: as a
script, tests/ would come first on sys.path and tests/livekit.py would hide the `livekit` SDK.
The rtc SDK makes its sockets in threads of its own (Rust, tokio): to run inside a network
namespace, run this as a process there (tests/livekit.py: `ns.popen`).

What it does: connects (the moment `connect()` returns is "joined") and prints
`{"event": "joined", ...}` on stdout, so that whoever dispatches the agent can do it then; waits
for the agent's first audio (its greeting); then, `--utterances` times, speaks the next utterance
of the WAV (the WAV cut at its pauses longer than 250 ms) followed by `--pause` seconds of
silence, in which the agent answers (with `--until FILE`: on until FILE exists, then `--after`
more: a call as long as whatever it outlasts). Then it leaves, and writes the report (JSON,
also the last line on stdout, `{"event": "report", ...}`):

- `join_to_first_audio_ms`: joined -> the first frame of agent audio above the loudness
  threshold;
- `joined_at`: when it joined, on the machine's monotonic clock (to place what others did
  meanwhile, e.g. a deploy, among the report's times, which count from it);
- `utterances[i].reply_ms`: the end of utterance i (its last sample handed to WebRTC) -> the
  first loud frame of agent audio after it (null: no answer before the next utterance ended);
- `gaps`: every stretch longer than `--min-gap` (100 ms) without loud agent audio *while the
  agent speaks*: inside its greeting or an answer, i.e. between its first and last loud frame
  before the next utterance (so the silence between answers is no gap). The agent's answers are
  expected to be continuous sound, as the example's tones are; an answer cut short shows as a
  gap or as a missing answer. Times of what was heard are on the playout clock (each frame
  after all the audio before it on its track: see `on_playout_clock`), so that a busy caller
  makes no gap of its own;
- `onsets`: where the agent's sound begins after more than `--min-gap` of silence (its greeting,
  each answer, the greeting of an agent that joined the room again), seconds since joined;
- `track_starts`: the first loud frame of each of the agent's tracks (a new one each time an
  agent joins), seconds since joined;
- `stalls`: stretches longer than `--min-gap` in which no frame arrived at all (the SDK or the
  caller held up), and `late_ms`: how long after its place on the playout clock the last frame
  arrived (near 0 when the stream ran continuously).

Exit status 0 when it heard an answer to every utterance, 1 otherwise, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import sys
import time
import wave
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from livekit import api, rtc

ROOT = Path(__file__).resolve().parent.parent
SPEECH = ROOT / "examples" / "voice_agent" / "speech.wav"
LISTEN_RATE = 48_000
LOUD = 1000.0  # RMS of a 16-bit frame above which the agent is speaking (about -30 dBFS)


@dataclass
class Heard:
    """One frame of the agent's audio, as it arrived (monotonic seconds), of one track."""

    at: float
    duration: float
    rms: float
    track: str = ""


@dataclass
class Spoken:
    """One utterance the caller spoke: when its first sample went out, when its last did."""

    start: float
    end: float


@dataclass
class Utterance:
    end_s: float  # since joined
    reply_ms: float | None


@dataclass
class Gap:
    at_s: float  # since joined: where the agent's audio stopped
    ms: float


@dataclass
class Stall:
    at_s: float  # since joined
    ms: float


@dataclass
class Report:
    room: str
    joined_at: float  # time.monotonic() when connect() returned (the machine's monotonic clock)
    join_ms: float  # connect() called -> returned
    join_to_first_audio_ms: float | None
    utterances: list[Utterance] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)
    stalls: list[Stall] = field(default_factory=list)
    # Where the agent's sound begins after a silence longer than min_gap (greeting, answers, the
    # greeting of an agent that joined again), in seconds since joined.
    onsets: list[float] = field(default_factory=list)
    # Each of the agent's audio tracks (a new one each time an agent joins): its first loud
    # frame, in seconds since joined.
    track_starts: dict[str, float] = field(default_factory=dict)
    late_ms: float = 0.0  # how much later than its place the last frame arrived
    frames_heard: int = 0
    loud_frames: int = 0

    @property
    def answered(self) -> bool:
        return bool(self.utterances) and all(u.reply_ms is not None for u in self.utterances)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "answered": self.answered}


def split_utterances(
    pcm: np.ndarray, rate: int, min_pause: float = 0.25, threshold_db: float = -35.0
) -> list[np.ndarray]:
    """The WAV's speech cut at its pauses longer than `min_pause`, by 20 ms frame energy;
    leading and trailing quiet dropped from each piece."""
    frame = rate // 50
    n = len(pcm) // frame
    frames = pcm[: n * frame].astype(np.float32).reshape(n, frame)
    loud = np.sqrt(np.mean(frames * frames, axis=1)) > 10 ** (threshold_db / 20) * 32768
    pieces: list[np.ndarray] = []
    start: int | None = None
    quiet = 0
    pause = int(min_pause * 50)
    for i, is_loud in enumerate(loud):
        if is_loud:
            if start is None:
                start = i
            quiet = 0
        elif start is not None:
            quiet += 1
            if quiet > pause:
                pieces.append(pcm[start * frame : (i - quiet + 1) * frame])
                start, quiet = None, 0
    if start is not None:
        pieces.append(pcm[start * frame : (n - quiet) * frame])
    return pieces


def on_playout_clock(heard: list[Heard]) -> list[Heard]:
    """Each frame placed where it plays, not when this process got it. The SDK renders a
    remote audio track as a continuous stream of frames, silence included, so a frame plays
    after all the audio before it on its track: its place is an anchor plus that audio's
    length. The anchor is the frame that arrived earliest for its place: a busy event loop or
    a burst of frames on our side only ever makes frames late, never early."""
    placed: list[Heard] = []
    for track in dict.fromkeys(h.track for h in heard):
        frames = [h for h in heard if h.track == track]
        starts = list(itertools.accumulate((h.duration for h in frames), initial=0.0))
        anchor = min(h.at - start for h, start in zip(frames, starts, strict=False))
        placed += [
            Heard(anchor + start, h.duration, h.rms, track)
            for h, start in zip(frames, starts, strict=False)
        ]
    return sorted(placed, key=lambda h: h.at)


def analyse(
    room: str,
    connect_at: float,
    joined: float,
    spoken: list[Spoken],
    heard: list[Heard],
    *,
    loud: float = LOUD,
    min_gap: float = 0.1,
) -> Report:
    """The report, from what was said and heard (pure: replayable in a unit test).

    Gaps are holes in the agent's sound as it plays (on the playout clock); stalls are
    stretches longer than `min_gap` in which no frame at all arrived here, loud or not (the
    SDK or this process held up): a stall with no gap was made up again from the SDK's
    buffer."""
    placed = on_playout_clock(heard)
    sounds = [h for h in placed if h.rms >= loud]
    report = Report(
        room=room,
        joined_at=joined,
        join_ms=round((joined - connect_at) * 1000, 1),
        join_to_first_audio_ms=round((sounds[0].at - joined) * 1000, 1) if sounds else None,
        frames_heard=len(heard),
        loud_frames=len(sounds),
    )
    sounding_until = -math.inf
    for h in sounds:
        if h.at - sounding_until > min_gap:
            report.onsets.append(round(h.at - joined, 3))
        sounding_until = max(sounding_until, h.at + h.duration)
        report.track_starts.setdefault(h.track, round(h.at - joined, 3))
    for track in dict.fromkeys(h.track for h in heard):
        arrived = [h for h in heard if h.track == track]
        for before, after in itertools.pairwise(arrived):
            if after.at - before.at > min_gap:
                report.stalls.append(
                    Stall(
                        at_s=round(before.at - joined, 3),
                        ms=round((after.at - before.at) * 1000, 1),
                    )
                )
        last = [h for h in placed if h.track == track][-1]
        report.late_ms = max(report.late_ms, round((arrived[-1].at - last.at) * 1000, 1))
    starts: list[float] = [sounds[0].at] if sounds else []
    for i, said in enumerate(spoken):
        until = spoken[i + 1].end if i + 1 < len(spoken) else float("inf")
        reply = next((h.at for h in sounds if said.end < h.at < until), None)
        report.utterances.append(
            Utterance(
                end_s=round(said.end - joined, 3),
                reply_ms=None if reply is None else round((reply - said.end) * 1000, 1),
            )
        )
        if reply is not None:
            starts.append(reply)
    # The agent speaks from each start (greeting, answers) to its last loud frame before the
    # caller's next utterance begins; every hole in that span longer than min_gap is a gap.
    stops = [s.start for s in spoken if sounds and s.start > sounds[0].at] + [float("inf")]
    for start in starts:
        stop = next(s for s in stops if s > start)
        span = [h for h in sounds if start <= h.at < stop]
        for before, after in itertools.pairwise(span):
            hole = after.at - before.at - before.duration
            if hole > min_gap:
                report.gaps.append(Gap(at_s=round(before.at - joined, 3), ms=round(hole * 1000, 1)))
    return report


def token(key: str, secret: str, room: str, identity: str) -> str:
    grant = api.VideoGrants(room_join=True, room=room, can_publish=True, can_subscribe=True)
    return api.AccessToken(key, secret).with_identity(identity).with_grants(grant).to_jwt()


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


async def run(args: argparse.Namespace) -> Report:
    with wave.open(str(args.wav)) as w:
        if w.getnchannels() != 1 or w.getsampwidth() != 2:
            raise SystemExit(f"{args.wav}: need 16-bit mono")
        rate = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    pieces = split_utterances(pcm, rate)
    if not pieces:
        raise SystemExit(f"{args.wav}: no speech found")

    room = rtc.Room()
    heard: list[Heard] = []
    first_sound = asyncio.Event()
    listeners: list[asyncio.Task[None]] = []

    async def listen(track: rtc.Track) -> None:
        async for event in rtc.AudioStream(track, sample_rate=LISTEN_RATE, num_channels=1):
            samples = np.frombuffer(event.frame.data, dtype=np.int16).astype(np.float32)
            rms = float(np.sqrt(np.mean(samples * samples))) if len(samples) else 0.0
            heard.append(Heard(time.monotonic(), event.frame.duration, rms, track.sid))
            if rms >= args.loud:
                first_sound.set()

    def subscribed(
        track: rtc.Track, _: rtc.RemoteTrackPublication, who: rtc.RemoteParticipant
    ) -> None:
        if track.kind == rtc.TrackKind.KIND_AUDIO:
            emit("track", sid=track.sid, participant=who.identity)
            listeners.append(asyncio.create_task(listen(track)))

    room.on("track_subscribed", subscribed)
    connect_at = time.monotonic()
    await room.connect(args.url, token(args.api_key, args.api_secret, args.room, args.identity))
    joined = time.monotonic()
    emit("joined", room=args.room, identity=args.identity, join_ms=(joined - connect_at) * 1000)

    source = rtc.AudioSource(rate, 1)
    mic = rtc.LocalAudioTrack.create_audio_track("mic", source)
    await room.local_participant.publish_track(
        mic, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
    )
    frame = rate // 100
    silence = np.zeros(frame, dtype=np.int16)

    async def say(samples: np.ndarray) -> None:
        for i in range(0, len(samples) - frame + 1, frame):
            chunk = samples[i : i + frame]
            await source.capture_frame(rtc.AudioFrame(chunk.tobytes(), rate, 1, frame))

    spoken: list[Spoken] = []
    try:
        await asyncio.wait_for(first_sound.wait(), args.wait_first_audio)
    except TimeoutError:
        emit("no_agent_audio", after_s=args.wait_first_audio)
    else:
        await say(np.tile(silence, int(args.pause * 100)))  # let the greeting end
        # Without --until: --utterances, then leave. With it: on until the file exists (at
        # most --max-utterances), then --after more, and at least --utterances in all.
        last = args.utterances if args.until is None else None
        n = 0
        while n < (last if last is not None else args.max_utterances):
            # The source queues ahead; once the queue is played out, the next sample goes now.
            await source.wait_for_playout()
            start = time.monotonic()
            await say(pieces[n % len(pieces)])
            await source.wait_for_playout()
            spoken.append(Spoken(start, time.monotonic()))
            emit("said", n=n, end_s=round(spoken[-1].end - joined, 3))
            n += 1
            if last is None and args.until.exists():
                last = max(args.utterances, n + args.after)
                emit("until", n=n, last=last)
            await say(np.tile(silence, int(args.pause * 100)))
        await source.wait_for_playout()
    await room.disconnect()
    for task in listeners:
        task.cancel()
    await asyncio.gather(*listeners, return_exceptions=True)
    await source.aclose()
    return analyse(
        args.room, connect_at, joined, spoken, heard, loud=args.loud, min_gap=args.min_gap
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("LIVEKIT_URL", "ws://127.0.0.1:7880"))
    parser.add_argument("--api-key", default=os.environ.get("LIVEKIT_API_KEY", "devkey"))
    parser.add_argument("--api-secret", default=os.environ.get("LIVEKIT_API_SECRET", "secret"))
    parser.add_argument("--room", required=True)
    parser.add_argument("--identity", default="caller")
    parser.add_argument("--wav", type=Path, default=SPEECH)
    parser.add_argument("--utterances", type=int, default=3, help="(with --until: at least)")
    parser.add_argument(
        "--until", type=Path, help="speak on until this file exists, then --after more"
    )
    parser.add_argument("--after", type=int, default=2)
    parser.add_argument("--max-utterances", type=int, default=80)
    parser.add_argument("--pause", type=float, default=2.0, help="seconds after each utterance")
    parser.add_argument("--wait-first-audio", type=float, default=60.0)
    parser.add_argument("--loud", type=float, default=LOUD, help="RMS that counts as sound")
    parser.add_argument("--min-gap", type=float, default=0.1, help="seconds")
    parser.add_argument("--report", type=Path, help="also write the report here (JSON)")
    args = parser.parse_args(argv)
    report = asyncio.run(run(args))
    body = report.to_json()
    if args.report is not None:
        args.report.write_text(json.dumps(body, indent=2))
    emit("report", **body)
    return 0 if report.answered else 1


if __name__ == "__main__":
    code = main()
    # The report is out; leave without tearing down livekit-rtc's native runtime, which now and
    # then panics at interpreter exit ("panic in a function that cannot unwind", SIGABRT) after
    # a call that went perfectly.
    sys.stdout.flush()
    os._exit(code)
