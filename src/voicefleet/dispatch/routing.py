"""Which versions of an agent take new sessions, and in what shares. The control plane writes it;
the scheduler reads it for every job.

An agent with no entry is served by every worker registered with its name (workers started by
hand included). An agent with an entry is served only by workers of the listed versions, each
taking its weight's share of new sessions. The share a session falls in is a hash of its dispatch
(or room), so a retried or re-queued dispatch lands on the same version, and the split over many
sessions is exact to sampling error. When the chosen version has no free worker the session goes
to another listed version (an "overflow", counted) rather than waiting: a caller is never kept
waiting for a split. A version with weight 0 takes nothing, not even overflow (blue-green's green
before the switch); a job may still be pinned to one version (the smoke test's synthetic sessions).

Sessions in flight stay where they are whatever happens here.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from collections.abc import Callable, Mapping
from dataclasses import dataclass

BUCKETS = 10_000  # weights resolve to 0.01 %


@dataclass(frozen=True)
class Route:
    """The version chosen for a session, and the versions that may take it if that one is full."""

    version: str
    others: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Entry:
    weights: tuple[tuple[str, float], ...]  # as set, for display
    bounds: tuple[int, ...]  # cumulative bucket bounds of the versions with weight > 0
    versions: tuple[str, ...]  # those versions, in the same order
    routes: tuple[Route, ...]  # one per version: it, then the others


def bucket(session_key: str) -> int:
    """A session's place in [0, BUCKETS): stable across processes and restarts."""
    digest = hashlib.blake2b(session_key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


class RoutingTable:
    def __init__(self, default_deployment: str = "production") -> None:
        self.default_deployment = default_deployment
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._listeners: list[Callable[[str], None]] = []

    def on_change(self, listener: Callable[[str], None]) -> None:
        self._listeners.append(listener)

    def set_weights(
        self, agent_name: str, weights: Mapping[str, float] | None, deployment: str = ""
    ) -> None:
        """Route new sessions of `agent_name` (and `deployment`) to versions by weight.

        Weights are relative (they need not sum to 100). None removes the entry: any worker of
        the agent will do. An empty mapping, or all weights 0, routes to nothing: new sessions
        wait (an agent being deleted).
        """
        key = (agent_name, deployment or self.default_deployment)
        if weights is None:
            self._entries.pop(key, None)
        else:
            if any(w < 0 for w in weights.values()):
                raise ValueError("routing weights must be >= 0")
            live = [(v, w) for v, w in sorted(weights.items()) if w > 0]
            total = sum(w for _, w in live)
            bounds, acc = [], 0.0
            for _, w in live:
                acc += w
                bounds.append(round(acc / total * BUCKETS))
            versions = tuple(v for v, _ in live)
            self._entries[key] = _Entry(
                weights=tuple(sorted(weights.items())),
                bounds=tuple(bounds),
                versions=versions,
                routes=tuple(Route(v, tuple(o for o in versions if o != v)) for v in versions),
            )
        for listener in self._listeners:
            listener(agent_name)

    def choose(self, agent_name: str, deployment: str, session_key: str) -> Route | None:
        """The version for a new session; None when any worker of the agent will do."""
        entry = self._entries.get((agent_name, deployment or self.default_deployment))
        if entry is None:
            return None
        if not entry.versions:
            return Route("")  # routed to nothing: no worker matches
        if len(entry.versions) == 1:
            return entry.routes[0]
        return entry.routes[bisect_right(entry.bounds, bucket(session_key))]

    def weights(self, agent_name: str, deployment: str = "") -> dict[str, float] | None:
        entry = self._entries.get((agent_name, deployment or self.default_deployment))
        return None if entry is None else dict(entry.weights)

    def snapshot(self) -> dict[str, dict[str, float]]:
        return {f"{name}/{dep}": dict(e.weights) for (name, dep), e in self._entries.items()}
