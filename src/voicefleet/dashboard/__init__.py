"""The web dashboard at `/` of `vf server`: an overview of every agent; an agent's page with its
rollout and scale commands and its event log (who did what, from the API or from here);
instances with their live logs; sessions with each one's timeline; feature flags; autoscaling
decisions over time. Live over server-sent events.

It sits beside `api/` (same credentials, same services) and imports only what lies below it.
Pages are built in Python (`html.py`, escaped by construction; charts as inline SVG drawn by
`chart.py`) into two `string.Template` shells; one script and one stylesheet ship in `static/`;
no build step and nothing fetched.
"""

from __future__ import annotations

from voicefleet.dashboard.routes import router

__all__ = ["router"]
