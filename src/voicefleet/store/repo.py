"""The control plane's reads and writes, as methods; the services hold no SQL."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.orm import aliased

from voicefleet.store.models import (
    SYSTEM,
    Actor,
    AgentRow,
    ApiKeyRow,
    Base,
    DeploymentRow,
    EventRow,
    FlagRow,
    InstanceRow,
    RolloutRow,
    SecretRow,
    VersionRow,
)

RowT = TypeVar("RowT", bound=Base)


class Repo:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._session = async_sessionmaker(engine, expire_on_commit=False)
        self._written: list[Callable[[], None]] = []

    def on_write(self, listener: Callable[[], None]) -> None:
        """Call `listener()` after each write this repo commits (the dashboard re-renders
        what it shows only when something changed)."""
        self._written.append(listener)

    def _wrote(self) -> None:
        for listener in self._written:
            listener()

    async def _all(self, query: Any) -> list[Any]:
        async with self._session() as s:
            return list((await s.scalars(query)).all())

    async def _one(self, query: Any) -> Any:
        async with self._session() as s:
            return (await s.scalars(query)).first()

    async def save(self, *rows: Base) -> None:
        """Insert or update rows (merge by primary key) in one transaction."""
        async with self._session() as s, s.begin():
            for row in rows:
                await s.merge(row)
        self._wrote()

    async def remove(self, *rows: Base) -> None:
        async with self._session() as s, s.begin():
            for row in rows:
                await s.delete(await s.merge(row))
        self._wrote()

    # -- agents -------------------------------------------------------------------------------

    async def agent(self, key: str) -> AgentRow | None:
        """An agent by id (`CA_…`) or by name."""
        row: AgentRow | None = await self._one(
            select(AgentRow).where((AgentRow.id == key) | (AgentRow.name == key))
        )
        return row

    async def agents(self) -> list[AgentRow]:
        return await self._all(select(AgentRow).order_by(AgentRow.created_at))

    async def delete_agent(self, agent_id: str) -> None:
        async with self._session() as s, s.begin():
            for table in (DeploymentRow, VersionRow, InstanceRow, SecretRow, RolloutRow, FlagRow):
                await s.execute(delete(table).where(table.agent_id == agent_id))
            await s.execute(delete(AgentRow).where(AgentRow.id == agent_id))
        self._wrote()

    # -- deployments and versions -------------------------------------------------------------

    async def deployment(self, agent_id: str, name: str) -> DeploymentRow | None:
        row: DeploymentRow | None = await self._one(
            select(DeploymentRow).where(
                DeploymentRow.agent_id == agent_id, DeploymentRow.name == name
            )
        )
        return row

    async def deployments(self, agent_id: str | None = None) -> list[DeploymentRow]:
        query = select(DeploymentRow).order_by(DeploymentRow.agent_id, DeploymentRow.name)
        if agent_id is not None:
            query = query.where(DeploymentRow.agent_id == agent_id)
        return await self._all(query)

    async def next_version_number(self, agent_id: str) -> int:
        async with self._session() as s:
            top = await s.scalar(
                select(func.max(VersionRow.number)).where(VersionRow.agent_id == agent_id)
            )
        return int(top or 0) + 1

    async def version(self, agent_id: str, version: str) -> VersionRow | None:
        row: VersionRow | None = await self._one(
            select(VersionRow).where(VersionRow.agent_id == agent_id, VersionRow.version == version)
        )
        return row

    async def versions(self, agent_id: str) -> list[VersionRow]:
        return await self._all(
            select(VersionRow)
            .where(VersionRow.agent_id == agent_id)
            .order_by(VersionRow.number.desc())
        )

    async def newest_versions(self) -> list[VersionRow]:
        """Each agent's newest version (one query for all agents)."""
        rank = func.row_number().over(
            partition_by=VersionRow.agent_id, order_by=VersionRow.number.desc()
        )
        ranked = select(VersionRow, rank.label("rank")).subquery()
        row = aliased(VersionRow, ranked)
        return await self._all(select(row).where(ranked.c.rank == 1))

    # -- instances ----------------------------------------------------------------------------

    async def instances(
        self, agent_id: str | None = None, statuses: Sequence[str] | None = None
    ) -> list[InstanceRow]:
        query = select(InstanceRow).order_by(InstanceRow.created_at)
        if agent_id is not None:
            query = query.where(InstanceRow.agent_id == agent_id)
        if statuses is not None:
            query = query.where(InstanceRow.status.in_(statuses))
        return await self._all(query)

    async def current_instances(self, stopped: str, since: float) -> list[InstanceRow]:
        """Every agent's instances but those in status `stopped` since before `since` (one
        query)."""
        return await self._all(
            select(InstanceRow)
            .where((InstanceRow.status != stopped) | (InstanceRow.updated_at >= since))
            .order_by(InstanceRow.created_at)
        )

    async def set_instance_status(
        self, instance_id: str, status: str, unless: str | None = None, **fields: Any
    ) -> None:
        """Set an instance's status (and fields), unless its status is now `unless`. One
        statement: an instance deleted meanwhile (its agent was) is left deleted."""
        query = update(InstanceRow).where(InstanceRow.id == instance_id)
        if unless is not None:
            query = query.where(InstanceRow.status != unless)
        async with self._session() as s, s.begin():
            await s.execute(query.values(status=status, updated_at=time.time(), **fields))
        self._wrote()

    async def change_instance_status(self, row: InstanceRow, status: str) -> bool:
        """Set `row`'s status if the store still has the instance as `row` was read (same
        status, same update time); False when another change came first. One statement: two
        tasks that read the same row cannot both act on it."""
        query = update(InstanceRow).where(
            InstanceRow.id == row.id,
            InstanceRow.status == row.status,
            InstanceRow.updated_at == row.updated_at,
        )
        async with self._session() as s, s.begin():
            result = await s.execute(query.values(status=status, updated_at=time.time()))
        self._wrote()
        return bool(result.rowcount)  # type: ignore[attr-defined]

    # -- secrets ------------------------------------------------------------------------------

    async def secrets(self, agent_id: str) -> list[SecretRow]:
        return await self._all(
            select(SecretRow).where(SecretRow.agent_id == agent_id).order_by(SecretRow.name)
        )

    async def replace_secrets(self, agent_id: str, rows: Sequence[SecretRow]) -> None:
        """The agent's secrets become exactly `rows`, in one transaction."""
        async with self._session() as s, s.begin():
            await s.execute(delete(SecretRow).where(SecretRow.agent_id == agent_id))
            for row in rows:
                await s.merge(row)

    async def unset_secrets(self, agent_id: str, names: Sequence[str]) -> int:
        async with self._session() as s, s.begin():
            result = await s.execute(
                delete(SecretRow).where(SecretRow.agent_id == agent_id, SecretRow.name.in_(names))
            )
        self._wrote()
        return int(result.rowcount or 0)  # type: ignore[attr-defined]

    # -- flags --------------------------------------------------------------------------------

    async def flags(self, agent_id: str | None = None) -> list[FlagRow]:
        query = select(FlagRow).order_by(FlagRow.agent_id, FlagRow.key)
        if agent_id is not None:
            query = query.where(FlagRow.agent_id == agent_id)
        return await self._all(query)

    async def delete_flag(self, agent_id: str, key: str) -> int:
        async with self._session() as s, s.begin():
            result = await s.execute(
                delete(FlagRow).where(FlagRow.agent_id == agent_id, FlagRow.key == key)
            )
        self._wrote()
        return int(result.rowcount or 0)  # type: ignore[attr-defined]

    # -- rollouts and events ------------------------------------------------------------------

    async def rollout(self, rollout_id: str) -> RolloutRow | None:
        row: RolloutRow | None = await self._one(
            select(RolloutRow).where(RolloutRow.id == rollout_id)
        )
        return row

    async def rollouts(
        self, agent_id: str | None = None, states: Sequence[str] | None = None, limit: int = 50
    ) -> list[RolloutRow]:
        query = select(RolloutRow).order_by(RolloutRow.created_at.desc()).limit(limit)
        if agent_id is not None:
            query = query.where(RolloutRow.agent_id == agent_id)
        if states is not None:
            query = query.where(RolloutRow.state.in_(states))
        return await self._all(query)

    async def last_rollouts(self) -> list[RolloutRow]:
        """The newest rollout of each (agent, deployment) that had one, newest first (one
        query for all agents)."""
        rank = func.row_number().over(
            partition_by=(RolloutRow.agent_id, RolloutRow.deployment),
            order_by=RolloutRow.created_at.desc(),
        )
        ranked = select(RolloutRow, rank.label("rank")).subquery()
        row = aliased(RolloutRow, ranked)
        return await self._all(
            select(row).where(ranked.c.rank == 1).order_by(ranked.c.created_at.desc())
        )

    async def event(self, agent_id: str, kind: str, message: str, actor: Actor = SYSTEM) -> None:
        await self.save(
            EventRow(
                agent_id=agent_id,
                kind=kind,
                message=message,
                actor=actor.label,
                ip=actor.ip,
                at=time.time(),
            )
        )

    async def events(
        self,
        agent_id: str | None = None,
        limit: int = 100,
        *,
        since: float | None = None,
        until: float | None = None,
        before: int | None = None,
        kinds: Sequence[str] = (),
        actor: str | None = None,
        changes_only: bool = False,
    ) -> list[EventRow]:
        """Newest first; `before` (an event id) pages back from there. `actor` is a key: its
        events from any place (API, dashboard). `changes_only`: those someone asked for."""
        query = select(EventRow).order_by(EventRow.id.desc()).limit(limit)
        if agent_id is not None:
            query = query.where(EventRow.agent_id == agent_id)
        if since is not None:
            query = query.where(EventRow.at >= since)
        if until is not None:
            query = query.where(EventRow.at < until)
        if before is not None:
            query = query.where(EventRow.id < before)
        if kinds:
            query = query.where(EventRow.kind.in_(kinds))
        if actor is not None:
            query = query.where(
                (EventRow.actor == actor) | EventRow.actor.startswith(f"{actor} (", autoescape=True)
            )
        if changes_only:
            query = query.where(EventRow.actor != "")
        return await self._all(query)

    # -- API keys -----------------------------------------------------------------------------

    async def api_key(self, key_id: str) -> ApiKeyRow | None:
        row: ApiKeyRow | None = await self._one(select(ApiKeyRow).where(ApiKeyRow.id == key_id))
        return row

    async def api_keys(self) -> list[ApiKeyRow]:
        return await self._all(select(ApiKeyRow).order_by(ApiKeyRow.created_at))

    async def key_used(self, key_id: str, at: float) -> None:
        async with self._session() as s, s.begin():
            await s.execute(update(ApiKeyRow).where(ApiKeyRow.id == key_id).values(last_used_at=at))
