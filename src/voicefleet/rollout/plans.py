"""A rollout's plan, typed: `Rolling | CanaryPlan | BlueGreen`, parsed and defaulted once.

The API parses what a caller sent (`parse_plan`); everything after takes the typed value. The
store keeps `plan.to_dict()` in the rollout's row, read back with `parse_plan` when a restarted
server resumes the rollout.
"""

from __future__ import annotations

from typing import Any

from voicefleet.errors import InvalidRequest
from voicefleet.rollout.bluegreen import BlueGreen
from voicefleet.rollout.canary import CanaryPlan
from voicefleet.rollout.rolling import Rolling

Plan = Rolling | CanaryPlan | BlueGreen


def parse_plan(data: dict[str, Any] | None) -> Plan:
    """A plan from its JSON form, checked and with defaults filled in; rolling when empty."""
    data = data or {}
    strategy = data.get("strategy", "rolling")
    if strategy == "rolling":
        return Rolling()
    if strategy == "canary":
        return CanaryPlan.from_dict(data)
    if strategy == "bluegreen":
        return BlueGreen.from_dict(data)
    raise InvalidRequest(f"unknown strategy '{strategy}' (rolling, canary or bluegreen)")
