"""Gateway mode: voicefleet registered with a LiveKit server as the worker of its agents."""

from voicefleet.gateway.gateway import Gateway
from voicefleet.gateway.target import LiveKitTarget

__all__ = ["Gateway", "LiveKitTarget"]
