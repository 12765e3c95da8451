"""Instances: running processes of versions over a `Runtime`, as the store records them and the
dispatcher sees them. `Instances` is the fleet the rollouts drive (`voicefleet.rollout.model.Fleet`)
and the control plane resizes; it acts on a resolved `Target`, never on ids to re-read."""

from voicefleet.fleet.instances import (
    LIVE,
    Instances,
    Lifecycle,
    NotServing,
    Target,
)
from voicefleet.fleet.paths import Paths

__all__ = ["LIVE", "Instances", "Lifecycle", "NotServing", "Paths", "Target"]
