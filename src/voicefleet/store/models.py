"""Tables. The dispatch path never waits on these: the recorder writes them behind it."""

from __future__ import annotations

from sqlalchemy import JSON, Float, Index, Integer, String, Table, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class DispatchRow(Base):
    __tablename__ = "dispatches"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    agent_name: Mapped[str] = mapped_column(String(200))
    room: Mapped[str] = mapped_column(String(200), index=True)
    metadata_: Mapped[str] = mapped_column("metadata", Text, default="")
    attributes: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    deployment: Mapped[str] = mapped_column(String(100), default="")
    created_at: Mapped[float] = mapped_column(Float)
    deleted_at: Mapped[float] = mapped_column(Float, default=0.0)


class JobRow(Base):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_state_created", "state", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    dispatch_id: Mapped[str] = mapped_column(String(32), index=True)
    agent_name: Mapped[str] = mapped_column(String(200))
    namespace: Mapped[str] = mapped_column(String(200), default="")
    job_type: Mapped[int] = mapped_column(Integer, default=0)
    room: Mapped[str] = mapped_column(String(200))
    room_sid: Mapped[str] = mapped_column(String(40))
    metadata_: Mapped[str] = mapped_column("metadata", Text, default="")
    attributes: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    deployment: Mapped[str] = mapped_column(String(100), default="")
    state: Mapped[str] = mapped_column(String(16))
    error: Mapped[str] = mapped_column(Text, default="")
    worker_id: Mapped[str] = mapped_column(String(40), default="")
    agent_id: Mapped[str] = mapped_column(String(40), default="")
    version: Mapped[str] = mapped_column(String(40), default="")
    instance: Mapped[str] = mapped_column(String(60), default="")
    participant_identity: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[float] = mapped_column(Float)
    assigned_at: Mapped[float] = mapped_column(Float, default=0.0)
    started_at: Mapped[float] = mapped_column(Float, default=0.0)
    ended_at: Mapped[float] = mapped_column(Float, default=0.0)


# The tables themselves, for Core statements (bulk upserts) that bypass the ORM.
DISPATCHES: Table = DispatchRow.__table__  # type: ignore[assignment]
JOBS: Table = JobRow.__table__  # type: ignore[assignment]
