"""A count of the changes to what the dashboard shows, so a page re-renders only when one
happened (and a stream open on an unchanged page costs nothing).

The composition root (`server.py`) wires `mark` to the services' change listeners: every
write to the store, every job's change, a worker registering, routing weights set. What a
page shows that changes without an event (a worker leaving, the last hour's window moving
on) is left to `stamp` (the count of connected workers) and to a page's slow refresh."""

from __future__ import annotations

from voicefleet.dispatch.service import DispatchService


class Changes:
    def __init__(self) -> None:
        self.count = 0

    def mark(self, *_: object) -> None:
        self.count += 1

    def stamp(self, dispatch: DispatchService) -> tuple[int, int]:
        """Equal to an earlier stamp when nothing changed since (a worker that goes leaves
        its jobs' changes, but one that goes with none only changes the count of workers)."""
        return self.count, len(dispatch.workers())
