"""A real livekit-agents worker whose jobs join their room: it proves that signalling and media
work, e.g. with a real livekit-server inside a network namespace (tests/livekit.py).

Each job connects (`ctx.connect()`, audio only), publishes a 440 Hz tone as its microphone and
listens to every other participant's audio. Once it has published a second of tone and heard
`expect_audio_from` other participants (each a tone, not silence), it writes
`<MARKER_DIR>/<job id>.joined` (JSON): the room, who is in it, what it heard, and its WebRTC
transports' statistics (selected ICE candidate pair, DTLS state, bytes). It goes on publishing
until the room goes away (e.g. the test deletes it) or `timeout` seconds, then writes
`<job id>.done` and ends the job.

Environment: MARKER_DIR (required), AGENT_NAME (default "room"), MAX_JOBS (default 8).
Job metadata (JSON, optional): {"expect_audio_from": 0, "timeout": 30}.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import struct
import time
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from livekit import rtc
from livekit.agents import AutoSubscribe, JobContext, WorkerOptions, cli

MARKER_DIR = Path(os.environ["MARKER_DIR"])
MAX_JOBS = int(os.environ.get("MAX_JOBS", "8"))
RATE = 48000
FRAME = RATE // 100  # 10 ms
TONE_PEAK = 8000
HEARD_FRAMES = 50  # half a second of someone's audio counts as heard
LOUD = TONE_PEAK // 4  # and some of it must be tone, not silence


def tone_frames() -> list[rtc.AudioFrame]:
    """One second of 440 Hz in 10 ms frames: a whole number of periods, so it loops cleanly."""
    samples = [int(TONE_PEAK * math.sin(2 * math.pi * 440 * i / RATE)) for i in range(RATE)]
    return [
        rtc.AudioFrame(struct.pack(f"<{FRAME}h", *samples[i : i + FRAME]), RATE, 1, FRAME)
        for i in range(0, RATE, FRAME)
    ]


def load(worker: object) -> float:
    # Jobs, not CPU: the tests' machines are shared, so CPU load would make "full" random.
    return min(len(worker.active_jobs) / MAX_JOBS, 1.0)  # type: ignore[attr-defined]


def transport_summary(stats: list[Any]) -> dict[str, Any]:
    """The facts that show media flowed, from one peer connection's stats report."""
    by_id: dict[str, tuple[str, Any]] = {}
    for s in stats:
        kind = s.WhichOneof("stats")
        if kind is not None:
            item = getattr(s, kind)
            by_id[item.rtc.id] = (kind, item)
    out: dict[str, Any] = {}
    for kind, item in by_id.values():
        if kind == "transport" and item.transport.selected_candidate_pair_id:
            t = item.transport
            pair = by_id[t.selected_candidate_pair_id][1].candidate_pair
            cand = {
                side: json_format.MessageToDict(by_id[cid][1].candidate)
                for side, cid in (
                    ("local", pair.local_candidate_id),
                    ("remote", pair.remote_candidate_id),
                )
            }
            out.update(
                dtls_state=json_format.MessageToDict(t).get("dtlsState"),
                ice_state=json_format.MessageToDict(t).get("iceState"),
                local=cand["local"],
                remote=cand["remote"],
                pair_bytes_sent=pair.bytes_sent,
                pair_bytes_received=pair.bytes_received,
            )
        elif kind == "outbound_rtp":
            out["rtp_packets_sent"] = out.get("rtp_packets_sent", 0) + item.sent.packets_sent
        elif kind == "inbound_rtp":
            got = item.received.packets_received
            out["rtp_packets_received"] = out.get("rtp_packets_received", 0) + got
    return out


async def entrypoint(ctx: JobContext) -> None:
    job = ctx.job
    opts = json.loads(job.metadata or "{}")
    expect = int(opts.get("expect_audio_from", 0))
    timeout = float(opts.get("timeout", 30))
    started = time.monotonic()
    ended = "timeout"
    try:
        await ctx.connect(auto_subscribe=AutoSubscribe.AUDIO_ONLY)
        room = ctx.room
        connected_s = time.monotonic() - started
        heard: dict[str, dict[str, int]] = {}
        listening: set[str] = set()
        tasks: list[asyncio.Task[None]] = []

        async def listen(track: rtc.Track, identity: str) -> None:
            entry = heard.setdefault(identity, {"frames": 0, "peak": 0})
            async for event in rtc.AudioStream(track, sample_rate=RATE, num_channels=1):
                samples = memoryview(event.frame.data).cast("B").cast("h")
                entry["frames"] += 1
                entry["peak"] = max(entry["peak"], max(samples), -min(samples))

        def subscribed(
            track: rtc.Track, _: rtc.RemoteTrackPublication, who: rtc.RemoteParticipant
        ) -> None:
            if track.kind == rtc.TrackKind.KIND_AUDIO and track.sid not in listening:
                listening.add(track.sid)
                tasks.append(asyncio.create_task(listen(track, who.identity)))

        room.on("track_subscribed", subscribed)
        for who in room.remote_participants.values():  # subscribed before we listened
            for pub in who.track_publications.values():
                if pub.track is not None:
                    subscribed(pub.track, pub, who)

        source = rtc.AudioSource(RATE, 1)
        track = rtc.LocalAudioTrack.create_audio_track("tone", source)
        options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
        await room.local_participant.publish_track(track, options)
        frames = tone_frames()
        sent = 0
        joined = False
        while time.monotonic() - started < timeout:
            if not room.isconnected():
                ended = "disconnected"
                break
            # Paced by the source: it holds a second, then takes frames in real time.
            await source.capture_frame(frames[sent % len(frames)])
            sent += 1
            loud = [
                who for who, h in heard.items() if h["frames"] >= HEARD_FRAMES and h["peak"] >= LOUD
            ]
            if not joined and sent >= len(frames) and len(loud) >= expect:
                joined = True
                stats = await room.get_rtc_stats()
                marker = {
                    "job_id": job.id,
                    "room": room.name,
                    "room_sid": await room.sid,
                    "identity": room.local_participant.identity,
                    "participants": sorted(room.remote_participants),
                    "heard": heard,
                    "connected_after_s": round(connected_s, 3),
                    "publisher": transport_summary(stats.publisher_stats),
                    "subscriber": transport_summary(stats.subscriber_stats),
                    "url": ctx._info.url,
                }
                tmp = MARKER_DIR / f"{job.id}.joined.tmp"
                tmp.write_text(json.dumps(marker))
                tmp.rename(MARKER_DIR / f"{job.id}.joined")
        for task in tasks:
            task.cancel()
    except asyncio.CancelledError:
        ended = "cancelled"
        raise
    except Exception as e:
        ended = f"error: {e!r}"
        raise
    finally:
        (MARKER_DIR / f"{job.id}.done").write_text(ended)
    ctx.shutdown(ended)


if __name__ == "__main__":
    cli.run_app(
        WorkerOptions(
            entrypoint_fnc=entrypoint,
            load_fnc=load,
            load_threshold=0.99,
            agent_name=os.environ.get("AGENT_NAME", "room"),
            num_idle_processes=1,
            port=0,
        )
    )
