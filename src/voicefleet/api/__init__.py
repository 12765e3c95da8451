"""`/api/v1`: the control plane's REST API by resource, used by the `vf` CLI (OpenAPI at /docs).

Handlers parse the request, call one service (`voicefleet.control`, the dispatcher's facade,
flags, the job history, API keys) and shape its answer; they hold no logic and touch no repository.
"""

from __future__ import annotations

from fastapi import APIRouter

from voicefleet.api import agents, dispatch, events, flags, instances, keys, rollouts, versions
from voicefleet.api.guard import Guard
from voicefleet.api.versions import UPLOADS_AT_ONCE

# In this order: a router's routes are matched before the next one's.
ROUTERS: tuple[APIRouter, ...] = (
    dispatch.router,
    agents.router,
    versions.router,
    rollouts.router,
    instances.router,
    flags.router,
    events.router,
    keys.router,
)

__all__ = ["ROUTERS", "UPLOADS_AT_ONCE", "Guard"]
