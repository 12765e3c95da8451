"""The web dashboard at `/` of `vf server`: an overview of every agent, an agent's page with its
rollout commands, recent sessions; live over server-sent events.

It sits beside `api/` (same credentials, same services) and imports only what lies below it.
Pages are built in Python (`html.py`, escaped by construction) into two `string.Template` shells;
one script and one stylesheet ship in `static/`; no build step.
"""

from __future__ import annotations

from voicefleet.dashboard.routes import router

__all__ = ["router"]
