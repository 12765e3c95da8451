"""What every runtime shares: the instances it follows, by id, and the one place where an
instance's status changes and the listeners (the fleet) are told, in order, synchronously."""

from __future__ import annotations

import logging
from typing import Generic, Protocol, TypeVar

from voicefleet.runtime import ChangeListener, InstanceState, InstanceStatus

log = logging.getLogger("voicefleet.runtime")


class Followed(Protocol):
    """A runtime's own record of an instance: whatever it keeps, the state it reports."""

    state: InstanceState


FollowedT = TypeVar("FollowedT", bound=Followed)


class RuntimeBase(Generic[FollowedT]):
    def __init__(self) -> None:
        self._instances: dict[str, FollowedT] = {}
        self._listeners: list[ChangeListener] = []

    def on_change(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)

    def get(self, instance_id: str) -> InstanceState | None:
        inst = self._instances.get(instance_id)
        return inst.state if inst else None

    def _set(self, inst: FollowedT, status: InstanceStatus) -> None:
        """Set `inst`'s status; a change (only a change) is logged and told to every listener."""
        if inst.state.status == status:
            return
        inst.state.status = status
        log.info("instance %s", status, extra={"instance": inst.state.spec.instance_id})
        for listener in self._listeners:
            listener(inst.state.spec.instance_id, status)
