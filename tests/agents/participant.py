"""A participant (not an agent) that joins a LiveKit room with the token it is given and stays
until its stdin closes or it is killed. Run it inside the rig's network namespace
(tests/livekit.py: `ns.popen`): the `livekit` rtc SDK makes its sockets in threads of its own.

    python tests/agents/participant.py   # env: LIVEKIT_URL, PARTICIPANT_TOKEN, PUBLISH=1

It prints `{"event": "joined", ...}` on stdout once connected; with PUBLISH=1 it then publishes a
microphone track of silence (what makes LiveKit start publisher jobs) and prints
`{"event": "published"}`. Its agent name dispatches live in the token (`RoomConfiguration`).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from livekit import rtc

RATE = 48000
FRAME = RATE // 100  # 10 ms


def say(**event: object) -> None:
    print(json.dumps(event), flush=True)


async def main() -> None:
    room = rtc.Room()
    await room.connect(os.environ["LIVEKIT_URL"], os.environ["PARTICIPANT_TOKEN"])
    say(event="joined", room=room.name, identity=room.local_participant.identity)
    stdin_closed = asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    if os.environ.get("PUBLISH") == "1":
        source = rtc.AudioSource(RATE, 1)
        track = rtc.LocalAudioTrack.create_audio_track("mic", source)
        options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
        await room.local_participant.publish_track(track, options)
        say(event="published")
        silence = rtc.AudioFrame(bytes(FRAME * 2), RATE, 1, FRAME)
        while not stdin_closed.done():
            await source.capture_frame(silence)  # paced by the source, in real time
    await stdin_closed
    await room.disconnect()


if __name__ == "__main__":
    asyncio.run(main())
