"""Binary protobuf frames of LiveKit's agent worker protocol."""

from __future__ import annotations

from google.protobuf.message import DecodeError
from livekit.protocol import agent

from voicefleet.errors import ProtocolError

WorkerMessage = agent.WorkerMessage
ServerMessage = agent.ServerMessage


def parse_worker_message(data: bytes) -> agent.WorkerMessage:
    """Decode one frame from a worker; an undecodable or empty frame is a ProtocolError."""
    msg = agent.WorkerMessage()
    try:
        msg.ParseFromString(data)
    except DecodeError as e:
        raise ProtocolError(f"frame is not a livekit.WorkerMessage: {e}") from None
    if msg.WhichOneof("message") is None:
        raise ProtocolError("frame is a WorkerMessage with no message set")
    return msg
