"""Which versions of an agent take new sessions. The control plane writes it; the scheduler reads.

An agent with no entry is served by every worker registered with its name (workers started by
hand included). An agent with an entry is served only by workers of the listed versions, so a
deploy moves new sessions with one assignment here while sessions in flight stay where they are.
"""

from __future__ import annotations

from collections.abc import Callable


class RoutingTable:
    def __init__(self) -> None:
        self._versions: dict[str, frozenset[str]] = {}
        self._listeners: list[Callable[[str], None]] = []

    def on_change(self, listener: Callable[[str], None]) -> None:
        self._listeners.append(listener)

    def versions(self, agent_name: str) -> frozenset[str] | None:
        """The versions taking new sessions for `agent_name`, or None: any worker will do."""
        return self._versions.get(agent_name)

    def route(self, agent_name: str, versions: frozenset[str] | set[str] | None) -> None:
        if versions is None:
            self._versions.pop(agent_name, None)
        else:
            self._versions[agent_name] = frozenset(versions)
        for listener in self._listeners:
            listener(agent_name)

    def snapshot(self) -> dict[str, list[str]]:
        return {name: sorted(v) for name, v in self._versions.items()}
