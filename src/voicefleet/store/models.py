"""Tables. The dispatch path never waits on these: the recorder writes them behind it."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, Float, Index, Integer, LargeBinary, String, Table, Text
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
    restart_policy: Mapped[int] = mapped_column(Integer, default=0)
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
    restart_policy: Mapped[int] = mapped_column(Integer, default=0)
    redispatches: Mapped[int] = mapped_column(Integer, default=0)


# The tables themselves, for Core statements (bulk upserts) that bypass the ORM.
DISPATCHES: Table = DispatchRow.__table__  # type: ignore[assignment]
JOBS: Table = JobRow.__table__  # type: ignore[assignment]


class AgentRow(Base):
    """A deployable agent: `CA_…` id, the `agent_name` workers register and dispatches ask for."""

    __tablename__ = "agents"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    grace_period: Mapped[float] = mapped_column(Float, default=3600.0)
    created_at: Mapped[float] = mapped_column(Float)


class DeploymentRow(Base):
    """A named deployment of an agent (`production`, `staging`): its serving version and size."""

    __tablename__ = "deployments"

    agent_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[str] = mapped_column(String(16), default="")
    replicas: Mapped[int] = mapped_column(Integer, default=1)
    # The autoscaling policy (voicefleet.autoscale.policy.Policy as a dict); None: fixed replicas.
    autoscale: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True, default=None)
    updated_at: Mapped[float] = mapped_column(Float)


class VersionStatus(StrEnum):
    BUILDING = "building"
    READY = "ready"  # built: it may be rolled out
    FAILED = "failed"


class VersionRow(Base):
    """An immutable build of an agent's source: `v1`, `v2`, …"""

    __tablename__ = "versions"

    agent_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    version: Mapped[str] = mapped_column(String(16), primary_key=True)
    number: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))  # a VersionStatus
    source_digest: Mapped[str] = mapped_column(String(80))
    dependency_digest: Mapped[str] = mapped_column(String(80), default="")
    python: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float)
    built_at: Mapped[float] = mapped_column(Float, default=0.0)
    # The container image the version runs as (the Kubernetes runtime): pushed by digest
    # (registry/name@sha256:…) when voicefleet built it, else the reference deployed as given.
    image: Mapped[str] = mapped_column(Text, default="")
    image_digest: Mapped[str] = mapped_column(String(80), default="")


class InstanceRow(Base):
    """One running worker process of a version; pid and start time identify it across restarts."""

    __tablename__ = "instances"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    agent_id: Mapped[str] = mapped_column(String(32), index=True)
    deployment: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    pid: Mapped[int] = mapped_column(Integer, default=0)
    pid_started_at: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class SecretRow(Base):
    """An agent's secret, encrypted at rest (Fernet); never returned by the API. Its kind:
    "env", an environment variable of every instance, or "file", a file of that name in each
    instance's own secrets directory (`--secret-mount`)."""

    __tablename__ = "secrets"

    agent_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    value: Mapped[bytes] = mapped_column(LargeBinary)
    updated_at: Mapped[float] = mapped_column(Float)
    kind: Mapped[str] = mapped_column(String(8), default="env", server_default="env")


class RolloutRow(Base):
    """A change of a deployment from one version to another; a rollback is one too."""

    __tablename__ = "rollouts"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    agent_id: Mapped[str] = mapped_column(String(32), index=True)
    deployment: Mapped[str] = mapped_column(String(64))
    from_version: Mapped[str] = mapped_column(String(16), default="")
    to_version: Mapped[str] = mapped_column(String(16))
    strategy: Mapped[str] = mapped_column(String(16), default="rolling")
    state: Mapped[str] = mapped_column(String(16))
    step: Mapped[str] = mapped_column(String(32), default="")
    reason: Mapped[str] = mapped_column(Text, default="")
    # The strategy's settings (canary steps, interval, thresholds; blue-green smoke test).
    plan: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # Canary: the share of new sessions the new version takes now, and since when.
    weight: Mapped[float] = mapped_column(Float, default=0.0)
    step_started_at: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class FlagRow(Base):
    """A feature flag of an agent: its definition (see voicefleet.sdk.evaluate) and who set it."""

    __tablename__ = "flags"

    agent_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    definition: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at: Mapped[float] = mapped_column(Float)
    updated_by: Mapped[str] = mapped_column(String(100), default="")


class EventRow(Base):
    """The event log: who did what to which agent (none: `agent_id` ""), from where, and what
    the platform did in answer (`actor` "")."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    agent_id: Mapped[str] = mapped_column(String(32), index=True, default="")
    kind: Mapped[str] = mapped_column(String(40))
    message: Mapped[str] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(String(100), default="")
    ip: Mapped[str] = mapped_column(String(64), default="")  # the caller's address; "" local
    at: Mapped[float] = mapped_column(Float, index=True)


API = "api"  # where most changes come from: recorded as the bare key


@dataclass(frozen=True)
class Actor:
    """Who asks for a change, for the event log: the key (a voicefleet key's id, or the
    project's LiveKit key), where the request came from (`via`: "api", "dashboard", "cli" for
    the data dir itself) and the client's address. The default is the platform's own doing."""

    key: str = ""
    via: str = API
    ip: str = ""

    @property
    def label(self) -> str:
        """As `events.actor` (and a flag's `updated_by`) record it: the bare key through the
        API (as events have always named it), else "<key> (<via>)"; "" for the platform."""
        if not self.key:
            return ""
        return (self.key if self.via == API else f"{self.key} ({self.via})")[:100]


SYSTEM = Actor()


def actor_parts(actor: str) -> tuple[str, str]:
    """(key, via) of a recorded `events.actor`; ("", "") for the platform's own doing."""
    if not actor:
        return "", ""
    key, sep, via = actor.rpartition(" (")
    if sep and via.endswith(")") and key:
        return key, via[:-1]
    return actor, API


class ApiKeyRow(Base):
    """A voicefleet API key. Its secret is never stored: only `digest`, an HMAC-SHA256 of it
    under a pepper kept in the data dir (voicefleet.control.access)."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # vfk_…, shown and logged
    name: Mapped[str] = mapped_column(String(100), default="")
    role: Mapped[str] = mapped_column(String(16))  # a Role
    agent_id: Mapped[str] = mapped_column(String(32), default="")  # "": every agent
    digest: Mapped[str] = mapped_column(String(64))
    created_by: Mapped[str] = mapped_column(String(100), default="")
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float, default=0.0)  # 0: never
    revoked_at: Mapped[float] = mapped_column(Float, default=0.0)  # 0: not revoked
    last_used_at: Mapped[float] = mapped_column(Float, default=0.0)
