"""Job and dispatch history: written behind the dispatch path in batches, read back at start.

The hot path only marks a job dirty (a dict insert); `Recorder.run` flushes every
`interval` seconds in one transaction, so a burst of 3,000 assignments costs one commit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

from prometheus_client import Counter
from sqlalchemy import case, func, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from voicefleet.dispatch.jobs import ENDED, Dispatch, Job, JobState
from voicefleet.store.models import DISPATCHES, JOBS, DispatchRow, JobRow

log = logging.getLogger("voicefleet.store")

_JOB_FIELDS = (
    "id", "dispatch_id", "agent_name", "namespace", "job_type", "room", "room_sid", "attributes",
    "deployment", "state", "error", "worker_id", "agent_id", "version", "instance",
    "participant_identity", "created_at", "assigned_at", "started_at", "ended_at",
    "restart_policy", "redispatches",
)  # fmt: skip


_JOB_COLUMNS = (*_JOB_FIELDS, "metadata")
_DISPATCH_COLUMNS = (
    "id", "agent_name", "room", "metadata", "attributes", "deployment", "restart_policy",
    "created_at", "deleted_at",
)  # fmt: skip


# Why sessions failed, as a metric label: a small fixed set (never the error's text, unbounded).
FAILURE_KINDS = ("crashed", "killed", "exited", "not_started", "worker_lost", "no_worker", "other")
_EXCEPTION = re.compile(r"[A-Za-z_][\w.]*(: |$)")  # "RuntimeError: v2 is broken"


def failure_kind(error: str, previous: JobState | None) -> str:
    """The kind of reason a job failed for, from the state it failed in and its error: the
    launcher's words for what the worker reports (voicefleet.runtime.launch) or the dispatcher's."""
    if (
        (error.startswith("worker ") and " while the job was " in error)
        or error.startswith("voicefleet restarted")
        or (error.startswith("instance ") and error.endswith(" was stopped while the job ran"))
    ):
        return "worker_lost"
    if error.startswith("job process killed by "):
        return "killed"
    if error.startswith("job process exited with code "):
        return "exited"
    if previous == JobState.PENDING:
        return "no_worker"  # never assigned: the queue timed out
    if _EXCEPTION.match(error):
        return "crashed"  # the entrypoint raised: "<Type>: <message>"
    if previous == JobState.ASSIGNED:
        return "not_started"
    return "other"


def _sqlite_upsert(table: str, columns: tuple[str, ...], update: tuple[str, ...]) -> str:
    names = ", ".join(f'"{c}"' for c in columns)
    marks = ", ".join("?" for _ in columns)
    sets = ", ".join(f'"{c}" = excluded."{c}"' for c in update)
    return f"INSERT INTO {table} ({names}) VALUES ({marks}) ON CONFLICT (id) DO UPDATE SET {sets}"


_SQLITE_JOB_UPSERT = _sqlite_upsert("jobs", _JOB_COLUMNS, _JOB_COLUMNS[1:])
_SQLITE_DISPATCH_UPSERT = _sqlite_upsert("dispatches", _DISPATCH_COLUMNS, ("deleted_at",))


def _values(row: dict[str, Any], columns: tuple[str, ...]) -> tuple[Any, ...]:
    return tuple(json.dumps(row[c]) if c == "attributes" else row[c] for c in columns)


def _job_row(job: Job) -> dict[str, Any]:
    row = {f: getattr(job, f) for f in _JOB_FIELDS}
    row["state"] = str(job.state)
    row["metadata"] = job.metadata
    return row


def _dispatch_row(d: Dispatch) -> dict[str, Any]:
    return {
        "id": d.id,
        "agent_name": d.agent_name,
        "room": d.room,
        "metadata": d.metadata,
        "attributes": d.attributes,
        "deployment": d.deployment,
        "restart_policy": d.restart_policy,
        "created_at": d.created_at,
        "deleted_at": d.deleted_at,
    }


class Recorder:
    def __init__(
        self, engine: AsyncEngine, interval: float = 0.5, failures: Counter | None = None
    ) -> None:
        self.engine = engine
        self.interval = interval
        # Failed sessions by kind (label "kind"), counted where each job's end is first seen.
        self.failures = failures
        if failures is not None:
            for kind in FAILURE_KINDS:
                failures.labels(kind=kind)  # every kind's series exists, from 0
        self._jobs: dict[str, Job] = {}
        self._dispatches: dict[str, Dispatch] = {}
        # One flush at a time: a second one would find nothing left to write and return before
        # the first committed (a reader that flushes first would miss the newest states), and
        # two could commit out of order.
        self._flushing = asyncio.Lock()
        # Rows of a flush that failed, written again (under newer ones) by the next flush.
        self._unwritten: tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]] = ({}, {})
        # Changes marked so far, and how many of them the last commit covered (`stored`).
        self._marked = 0
        self._committed = 0

    def job_changed(self, job: Job, previous: JobState | None = None) -> None:
        self._jobs[job.id] = job
        self._marked += 1
        if self.failures is not None and job.state == JobState.FAILED and previous != job.state:
            self.failures.labels(kind=failure_kind(job.error, previous)).inc()

    def dispatch_changed(self, dispatch: Dispatch) -> None:
        self._dispatches[dispatch.id] = dispatch
        self._marked += 1

    async def stored(self) -> None:
        """Return once every change marked before this call is committed. Callers at the same
        moment share a commit: one whose changes a commit already covered (snapshotted while it
        waited for the lock) writes nothing, where `flush` would write whatever changed since,
        one commit per caller under load."""
        want = self._marked
        async with self._flushing:
            if self._committed < want:
                await self._flush()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.flush()
            except Exception:
                # The rows are kept for the next flush; dispatching goes on meanwhile.
                log.exception("writing job history failed; retrying")

    async def _write_sqlite(
        self,
        conn: AsyncConnection,
        jobs: dict[str, dict[str, Any]],
        dispatches: dict[str, dict[str, Any]],
    ) -> None:
        # The hot path at thousands of jobs a second: plain executemany with tuples costs a
        # tenth of SQLAlchemy's per-row parameter processing (which holds the GIL).
        if dispatches:
            await conn.exec_driver_sql(
                _SQLITE_DISPATCH_UPSERT,
                [_values(r, _DISPATCH_COLUMNS) for r in dispatches.values()],
            )
        if jobs:
            await conn.exec_driver_sql(
                _SQLITE_JOB_UPSERT, [_values(r, _JOB_COLUMNS) for r in jobs.values()]
            )

    async def _write_core(
        self,
        conn: AsyncConnection,
        jobs: dict[str, dict[str, Any]],
        dispatches: dict[str, dict[str, Any]],
    ) -> None:
        if dispatches:
            stmt = postgresql.insert(DISPATCHES)
            await conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["id"], set_={"deleted_at": stmt.excluded.deleted_at}
                ),
                list(dispatches.values()),
            )
        if jobs:
            stmt = postgresql.insert(JOBS)
            updates = {c: stmt.excluded[c] for c in _JOB_FIELDS if c != "id"}
            await conn.execute(
                stmt.on_conflict_do_update(index_elements=["id"], set_=updates), list(jobs.values())
            )

    async def history(
        self,
        *,
        limit: int = 100,
        room: str | None = None,
        state: str | None = None,
        job_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """Jobs newest first as the store has them, the changes not yet written included."""
        await self.flush()
        return await history(self.engine, limit=limit, room=room, state=state, job_id=job_id)

    async def flush(self) -> None:
        async with self._flushing:
            await self._flush()

    async def _flush(self) -> None:
        # Snapshot rows now: the objects keep changing while the write awaits.
        upto = self._marked
        old_jobs, old_dispatches = self._unwritten
        jobs = {**old_jobs, **{i: _job_row(j) for i, j in self._jobs.items()}}
        dispatches = {
            **old_dispatches,
            **{i: _dispatch_row(d) for i, d in self._dispatches.items()},
        }
        self._jobs, self._dispatches, self._unwritten = {}, {}, ({}, {})
        if not jobs and not dispatches:
            self._committed = upto
            return
        try:
            async with self.engine.begin() as conn:
                if self.engine.dialect.name == "sqlite":
                    await self._write_sqlite(conn, jobs, dispatches)
                else:
                    await self._write_core(conn, jobs, dispatches)
        except Exception:
            self._unwritten = (jobs, dispatches)
            raise
        self._committed = upto


async def load_open(engine: AsyncEngine) -> tuple[list[Dispatch], list[Job]]:
    """Jobs not ended, and the (not deleted) dispatches they belong to, as the last run left
    them. Finished dispatches stay in the store only: memory holds what is live."""
    still_open = JobRow.state.not_in([str(s) for s in ENDED])
    async with engine.connect() as conn:
        jrows = (await conn.execute(select(JOBS).where(still_open))).all()
        drows = (
            await conn.execute(
                select(DISPATCHES).where(
                    DispatchRow.deleted_at == 0,
                    DispatchRow.id.in_(select(JobRow.dispatch_id).where(still_open)),
                )
            )
        ).all()
    dispatches = [
        Dispatch(
            id=r.id,
            agent_name=r.agent_name,
            room=r.room,
            metadata=r.metadata,
            attributes=dict(r.attributes or {}),
            deployment=r.deployment,
            restart_policy=r.restart_policy,
            created_at=r.created_at,
        )
        for r in drows
    ]
    jobs = []
    for r in jrows:
        job = Job(**{f: getattr(r, f) for f in _JOB_FIELDS if f not in ("state", "attributes")})
        job.state = JobState(r.state)
        job.metadata = r.metadata
        job.attributes = dict(r.attributes or {})
        jobs.append(job)
    return dispatches, jobs


async def history(
    engine: AsyncEngine,
    *,
    limit: int = 100,
    room: str | None = None,
    state: str | None = None,
    job_id: str | None = None,
) -> list[dict[str, Any]]:
    """Recent jobs, newest first, straight from the store."""
    query = select(JOBS).order_by(JobRow.created_at.desc()).limit(limit)
    if room:
        query = query.where(JobRow.room == room)
    if state:
        query = query.where(JobRow.state == state)
    if job_id:
        query = query.where(JobRow.id == job_id)
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    return [dict(r._mapping) for r in rows]


async def outcomes(engine: AsyncEngine, agent_name: str, since: float) -> dict[str, dict[str, Any]]:
    """Per version, the agent's sessions created since `since` that have ended: how many, how
    many failed, and the newest failure (job id, error, when)."""
    return (await all_outcomes(engine, since, agent_name)).get(agent_name, {})


async def all_outcomes(
    engine: AsyncEngine, since: float, agent_name: str | None = None
) -> dict[str, dict[str, dict[str, Any]]]:
    """`outcomes` of every agent (or of `agent_name`) by agent name, in two queries."""
    where = [JobRow.state.in_([str(s) for s in ENDED]), JobRow.created_at >= since]
    if agent_name is not None:
        where.append(JobRow.agent_name == agent_name)
    failed = JobRow.state == str(JobState.FAILED)
    counts = (
        select(
            JobRow.agent_name, JobRow.version, func.count(), func.sum(case((failed, 1), else_=0))
        )
        .where(*where)
        .group_by(JobRow.agent_name, JobRow.version)
    )
    rank = func.row_number().over(
        partition_by=(JobRow.agent_name, JobRow.version), order_by=JobRow.ended_at.desc()
    )
    ranked = (
        select(
            JobRow.agent_name, JobRow.version, JobRow.id, JobRow.error, JobRow.ended_at,
            rank.label("rank"),
        )
        .where(*where, failed)
        .subquery()
    )  # fmt: skip
    newest = select(ranked).where(ranked.c.rank == 1)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    async with engine.connect() as conn:
        for name, version, ended, failures in (await conn.execute(counts)).all():
            out.setdefault(name, {})[version] = {
                "ended": ended,
                "failed": int(failures),
                "last_failure": None,
            }
        if any(v["failed"] for by_version in out.values() for v in by_version.values()):
            for r in (await conn.execute(newest)).all():
                entry = out.get(r.agent_name, {}).get(r.version)
                if entry is not None:
                    entry["last_failure"] = {
                        "job_id": r.id,
                        "error": r.error,
                        "ended_at": r.ended_at,
                    }
    return out
