"""What an agent may import from voicefleet (nothing is required): live feature flags.

Standard library only; voicefleet's runtime puts this package on its instances' PYTHONPATH.
"""

from voicefleet.sdk.evaluate import Session
from voicefleet.sdk.flags import FlagsClient, flags

__all__ = ["FlagsClient", "Session", "flags"]
