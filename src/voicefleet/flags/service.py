"""Feature flags per agent: stored, changed with an event that says who and when, and pushed to
every running agent that streams them (voicefleet.sdk.flags) within milliseconds.

Definitions and their evaluation live in `voicefleet.sdk.evaluate` (standard library only), so
the server and the agents evaluate with the same code.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from voicefleet.errors import InvalidRequest, NotFound
from voicefleet.sdk.evaluate import Session, evaluate, validate
from voicefleet.store.models import SYSTEM, Actor, FlagRow
from voicefleet.store.repo import Repo


class FlagService:
    def __init__(self, repo: Repo) -> None:
        self.repo = repo
        self._flags: dict[str, dict[str, dict[str, Any]]] = {}  # agent id -> key -> definition
        self._versions: dict[str, int] = {}
        # Set, then replaced, at each change of an agent's flags: what streams wait on. (An
        # asyncio.Condition with wait_for timeouts lost its lock under load on Python 3.11,
        # and a flag change then waited forever for it.)
        self._changed: dict[str, asyncio.Event] = {}

    async def start(self) -> None:
        for row in await self.repo.flags():
            self._flags.setdefault(row.agent_id, {})[row.key] = self._public(row)

    @staticmethod
    def _public(row: FlagRow) -> dict[str, Any]:
        return {**row.definition, "updated_at": row.updated_at, "updated_by": row.updated_by}

    # -- reading ------------------------------------------------------------------------------

    def list(self, agent_id: str) -> list[dict[str, Any]]:
        return [self._flags[agent_id][k] for k in sorted(self._flags.get(agent_id, {}))]

    def get(self, agent_id: str, key: str) -> dict[str, Any]:
        flag = self._flags.get(agent_id, {}).get(key)
        if flag is None:
            raise NotFound(f"no flag '{key}'")
        return flag

    def evaluate(self, agent_id: str, key: str, session: Session) -> dict[str, Any]:
        value, reason = evaluate(self.get(agent_id, key), session)
        return {"key": key, "value": value, "reason": reason, "session": session.key}

    def version(self, agent_id: str) -> int:
        return self._versions.get(agent_id, 0)

    def snapshot(self, agent_id: str) -> dict[str, Any]:
        return {"version": self.version(agent_id), "flags": self.list(agent_id)}

    async def wait_change(self, agent_id: str, seen: int, timeout: float) -> bool:
        """Wait until the agent's flags change after version `seen`; False after `timeout`."""
        if self.version(agent_id) != seen:
            return True
        changed = self._changed.setdefault(agent_id, asyncio.Event())
        try:
            async with asyncio.timeout(timeout):
                await changed.wait()
        except TimeoutError:
            pass
        return self.version(agent_id) != seen

    # -- changing -----------------------------------------------------------------------------

    async def set(
        self, agent_id: str, definition: dict[str, Any], actor: Actor = SYSTEM
    ) -> dict[str, Any]:
        """Create or replace a flag (this also lifts a kill)."""
        try:
            clean = validate(definition)
        except (ValueError, TypeError, KeyError) as e:
            raise InvalidRequest(f"bad flag: {e}") from None
        before = self._flags.get(agent_id, {}).get(clean["key"])
        row = FlagRow(
            agent_id=agent_id,
            key=clean["key"],
            definition=clean,
            updated_at=time.time(),
            updated_by=actor.label,
        )
        await self.repo.save(row)  # in the store before any agent sees it
        what = "changed" if before else "created"
        await self.repo.event(
            agent_id, f"flag_{what}", f"{clean['key']} = {_describe(clean)}", actor=actor
        )
        await self._publish(agent_id, clean["key"], self._public(row))
        return self.get(agent_id, clean["key"])

    async def kill(self, agent_id: str, key: str, actor: Actor = SYSTEM) -> dict[str, Any]:
        """The kill switch: every session gets the flag's `off` value until it is set again."""
        flag = {
            k: v
            for k, v in self.get(agent_id, key).items()
            if k not in ("updated_at", "updated_by")
        }
        flag["killed"] = True
        row = FlagRow(
            agent_id=agent_id,
            key=key,
            definition=flag,
            updated_at=time.time(),
            updated_by=actor.label,
        )
        await self.repo.save(row)
        await self.repo.event(
            agent_id, "flag_killed", f"{key} killed: every session gets {json.dumps(flag['off'])}",
            actor=actor,
        )  # fmt: skip
        await self._publish(agent_id, key, self._public(row))
        return self.get(agent_id, key)

    async def delete(self, agent_id: str, key: str, actor: Actor = SYSTEM) -> None:
        self.get(agent_id, key)
        await self.repo.delete_flag(agent_id, key)
        await self.repo.event(agent_id, "flag_deleted", f"{key} deleted", actor=actor)
        await self._publish(agent_id, key, None)

    def forget(self, agent_id: str) -> None:
        """A deleted agent's flags leave memory (the store dropped them with the agent). Not
        published, and its version number stays: an open stream sees no change, so its
        draining instances keep the flags they have until their calls end."""
        self._flags.pop(agent_id, None)

    async def _publish(self, agent_id: str, key: str, flag: dict[str, Any] | None) -> None:
        flags = self._flags.setdefault(agent_id, {})
        if flag is None:
            flags.pop(key, None)
        else:
            flags[key] = flag
        self._versions[agent_id] = self.version(agent_id) + 1
        changed = self._changed.pop(agent_id, None)
        if changed is not None:
            changed.set()


def _describe(flag: dict[str, Any]) -> str:
    text = json.dumps(flag["value"])
    for rule in flag["rules"]:
        when = " and ".join(f"{c['attr']} {c['op']} {json.dumps(c['value'])}" for c in rule["when"])
        share = f"{rule['percent']:g}% of sessions" if rule["percent"] < 100 else "sessions"
        text += f"; {share}{' where ' + when if when else ''}: {json.dumps(rule['value'])}"
    return text
