"""The store on SQLite and on a real PostgreSQL server: migrations, repositories, job history.

PostgreSQL runs from Debian's package (`.ci/run` installs it): a throwaway cluster in a temp
folder on a free port, started and stopped by the fixture. Without PostgreSQL binaries the
PostgreSQL cases are skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.ext.asyncio import AsyncEngine

from voicefleet.control.access import Keys
from voicefleet.dispatch.jobs import Dispatch, Job, JobState
from voicefleet.errors import AuthError
from voicefleet.protocol.tokens import Role
from voicefleet.store.db import alembic_config, open_engine
from voicefleet.store.models import (
    Actor,
    AgentRow,
    Base,
    InstanceRow,
    RolloutRow,
    SecretRow,
    VersionRow,
)
from voicefleet.store.records import Recorder, all_outcomes, history, load_open, outcomes
from voicefleet.store.repo import Repo


def _pg_bindir() -> Path | None:
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    bindir = Path(out.stdout.strip())
    return bindir if (bindir / "initdb").exists() else None


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL binaries not installed (pg_config --bindir); .ci/run installs them")
    # Not under pytest's tmp root: that is private to root, and the server may run as postgres.
    root = Path(tempfile.mkdtemp(prefix="voicefleet-pg-"))
    data = root / "data"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # PostgreSQL refuses to run as root: run it as the package's `postgres` user then.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(root, "postgres")
    subprocess.run(
        [
            *as_user,
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            "vf",
            "--auth=trust",
            "-E",
            "UTF8",
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-o",
         f"-h 127.0.0.1 -p {port} -k {root}", "start"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    try:
        subprocess.run(
            [
                str(bindir / "createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-U",
                "vf",
                "voicefleet",
            ],
            check=True,
            capture_output=True,
        )
        yield f"postgresql+asyncpg://vf@127.0.0.1:{port}/voicefleet"
    finally:
        subprocess.run(
            [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
    else:
        url = request.getfixturevalue("postgres")
    eng = await open_engine(url)
    if request.param == "postgresql":  # one database for the module: start each test empty
        async with eng.begin() as conn:
            for table in ("jobs", "dispatches", "agents", "deployments", "versions", "instances",
                          "secrets", "rollouts", "events", "api_keys"):  # fmt: skip
                await conn.exec_driver_sql(f"DELETE FROM {table}")
    yield eng
    await eng.dispose()


async def test_migrations_are_idempotent_and_reach_head(engine: AsyncEngine) -> None:
    again = await open_engine(str(engine.url.render_as_string(hide_password=False)))
    async with again.connect() as conn:
        version = (await conn.exec_driver_sql("SELECT version_num FROM alembic_version")).scalar()
        # The migrations build exactly the tables the models describe.
        diffs = await conn.run_sync(
            lambda sync: compare_metadata(MigrationContext.configure(sync), Base.metadata)
        )
    await again.dispose()
    assert version == ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert diffs == []


async def test_repositories_round_trip_the_control_plane(engine: AsyncEngine) -> None:
    repo = Repo(engine)
    now = time.time()
    await repo.save(AgentRow(id="CA_1", name="bot", grace_period=60, created_at=now))
    assert (await repo.agent("bot")).id == "CA_1"  # type: ignore[union-attr]
    assert (await repo.agent("CA_1")).name == "bot"  # type: ignore[union-attr]
    assert await repo.next_version_number("CA_1") == 1
    for n in (1, 2):
        await repo.save(
            VersionRow(agent_id="CA_1", version=f"v{n}", number=n, status="ready",
                       source_digest=f"s{n}", created_at=now + n)
        )  # fmt: skip
    assert await repo.next_version_number("CA_1") == 3
    assert [v.version for v in await repo.versions("CA_1")] == ["v2", "v1"]

    await repo.save(
        InstanceRow(id="i1", agent_id="CA_1", deployment="production", version="v2",
                    status="starting", created_at=now, updated_at=now)
    )  # fmt: skip
    await repo.set_instance_status("i1", "ready", pid=42)
    [inst] = await repo.instances("CA_1", ["ready"])
    assert inst.pid == 42

    await repo.save(SecretRow(agent_id="CA_1", name="K", value=b"sealed", updated_at=now))
    assert [s.name for s in await repo.secrets("CA_1")] == ["K"]
    assert await repo.unset_secrets("CA_1", ["K", "missing"]) == 1

    await repo.save(
        RolloutRow(id="RO_1", agent_id="CA_1", deployment="production", to_version="v2",
                   state="progressing", created_at=now, updated_at=now)
    )  # fmt: skip
    assert [r.id for r in await repo.rollouts(states=["progressing"])] == ["RO_1"]
    await repo.event("CA_1", "deployed", "v2 is live")
    assert (await repo.events("CA_1"))[0].message == "v2 is live"

    await repo.delete_agent("CA_1")
    assert await repo.agent("CA_1") is None and await repo.versions("CA_1") == []


async def test_an_instance_changes_status_only_as_it_was_read(engine: AsyncEngine) -> None:
    """Two tasks that read the same instance (the reaper, a rollback taking it back) cannot
    both act on it: the second change finds it changed, on each store (floats compared)."""
    repo = Repo(engine)
    now = time.time()
    await repo.save(
        AgentRow(id="CA_1", name="bot", grace_period=60, created_at=now),
        InstanceRow(id="i1", agent_id="CA_1", deployment="production", version="v1",
                    status="retiring", created_at=now, updated_at=now + 0.123456789),
    )  # fmt: skip
    [reaper_read] = await repo.instances("CA_1", ["retiring"])
    [rollback_read] = await repo.instances("CA_1", ["retiring"])
    assert await repo.change_instance_status(rollback_read, "ready")
    assert not await repo.change_instance_status(reaper_read, "draining")
    [row] = await repo.instances("CA_1")
    assert row.status == "ready"
    assert await repo.change_instance_status(row, "retiring")  # as read now: it changes


async def test_recorder_upserts_job_history_and_reads_back_what_was_open(
    engine: AsyncEngine,
) -> None:
    recorder = Recorder(engine)
    dispatch = Dispatch(id="AD_1", agent_name="bot", room="r1", attributes={"a": "b"})
    jobs = [Job(id=f"AJ_{i}", dispatch_id="AD_1", agent_name="bot", room="r1", room_sid="RM_1")
            for i in range(3)]  # fmt: skip
    recorder.dispatch_changed(dispatch)
    for job in jobs:
        recorder.job_changed(job)
    await recorder.flush()
    jobs[0].state, jobs[0].worker_id = JobState.RUNNING, "AW_1"
    jobs[1].state, jobs[1].error = JobState.FAILED, "worker gone"
    for job in jobs[:2]:
        recorder.job_changed(job)
    await recorder.flush()

    rows = {r["id"]: r for r in await history(engine)}
    assert rows["AJ_0"]["state"] == "running" and rows["AJ_0"]["worker_id"] == "AW_1"
    assert rows["AJ_1"]["error"] == "worker gone"
    assert rows["AJ_2"]["state"] == "pending"
    dispatches, open_jobs = await load_open(engine)
    assert [d.id for d in dispatches] == ["AD_1"] and dispatches[0].attributes == {"a": "b"}
    assert sorted(j.id for j in open_jobs) == ["AJ_0", "AJ_2"]


async def test_api_keys_and_the_event_log_filters_on_each_store(engine: AsyncEngine) -> None:
    repo = Repo(engine)
    keys = Keys(repo, b"pepper" * 6)
    row, token = await keys.create("deployer", name="ci", actor=Actor("devkey", "api", "10.1.2.3"))
    principal = await keys.authenticate(token)
    assert (principal.key, principal.role, principal.name) == (row.id, Role.DEPLOYER, "ci")
    stored = await repo.api_key(row.id)
    assert stored is not None and token.partition(".")[2] not in stored.digest
    # Who did what, found by key: a key id's "_" is no wildcard ("vfk_" also matches "vfkX").
    await repo.event("CA_1", "scaled", "by the key", Actor(row.id, "dashboard", "::1"))
    await repo.event("CA_1", "scaled", "by another", Actor("vfkX" + row.id[4:], "dashboard"))
    await repo.event("CA_2", "built", "by nobody")
    found = await repo.events(None, 10, actor=row.id)
    assert [(e.message, e.actor, e.ip) for e in found] == [
        ("by the key", f"{row.id} (dashboard)", "::1")
    ]
    assert [e.kind for e in await repo.events(None, 10, changes_only=True)] == [
        "scaled", "scaled", "key_created"]  # fmt: skip
    newest = await repo.events(None, 2)
    older = await repo.events(None, 10, before=newest[-1].id)
    assert [e.message for e in newest + older] == [
        "by nobody",
        "by another",
        "by the key",
        f"key {row.id} (ci) created: deployer",
    ]
    await keys.revoke(row.id)
    with pytest.raises(AuthError, match="revoked"):
        await keys.authenticate(token)


async def test_the_reads_for_all_agents_at_once_give_what_each_agents_reads_give(
    engine: AsyncEngine,
) -> None:
    """The dashboard's overview reads every agent in one query per table: each agent's newest
    version, the last rollout of each deployment, instances but those long stopped, and the
    last hour's outcomes; each as the per-agent reads have it. And every write is announced."""
    repo = Repo(engine)
    writes: list[int] = []
    repo.on_write(lambda: writes.append(1))
    now = time.time()
    for a in (1, 2):
        await repo.save(AgentRow(id=f"CA_{a}", name=f"bot{a}", grace_period=60, created_at=now))
        for n in range(1, a + 2):
            await repo.save(
                VersionRow(agent_id=f"CA_{a}", version=f"v{n}", number=n, status="ready",
                           source_digest=f"s{n}", created_at=now + n)
            )  # fmt: skip
        for n, deployment in enumerate(("production", "production", "staging")):
            await repo.save(
                RolloutRow(id=f"RO_{a}{n}", agent_id=f"CA_{a}", deployment=deployment,
                           to_version="v1", state="succeeded", created_at=now + n,
                           updated_at=now + n)
            )  # fmt: skip
        await repo.save(
            InstanceRow(id=f"i{a}-old", agent_id=f"CA_{a}", deployment="production",
                        version="v1", status="stopped", created_at=now - 9000,
                        updated_at=now - 7200),
            InstanceRow(id=f"i{a}-gone", agent_id=f"CA_{a}", deployment="production",
                        version="v1", status="stopped", created_at=now - 600, updated_at=now - 60),
            InstanceRow(id=f"i{a}-up", agent_id=f"CA_{a}", deployment="production",
                        version="v1", status="ready", created_at=now - 9000,
                        updated_at=now - 7200),
        )  # fmt: skip
    assert len(writes) == 2 + 5 + 6 + 2  # one per committed save: agents, versions, rollouts...
    writes.clear()
    await repo.set_instance_status("i1-up", "ready")
    assert writes == [1]

    newest = {v.agent_id: v.version for v in await repo.newest_versions()}
    assert newest == {"CA_1": "v2", "CA_2": "v3"}
    last = [(r.agent_id, r.deployment, r.id) for r in await repo.last_rollouts()]
    assert sorted(last) == [
        ("CA_1", "production", "RO_11"), ("CA_1", "staging", "RO_12"),
        ("CA_2", "production", "RO_21"), ("CA_2", "staging", "RO_22"),
    ]  # fmt: skip
    current = sorted(i.id for i in await repo.current_instances("stopped", now - 3600))
    assert current == ["i1-gone", "i1-up", "i2-gone", "i2-up"]

    recorder = Recorder(engine)
    recorder.dispatch_changed(Dispatch(id="AD_1", agent_name="bot1", room="r1"))
    ends = [
        ("bot1", "v1", JobState.SUCCEEDED, ""), ("bot1", "v1", JobState.FAILED, "old"),
        ("bot1", "v1", JobState.FAILED, "new"), ("bot1", "v2", JobState.SUCCEEDED, ""),
        ("bot2", "v1", JobState.FAILED, "boom"), ("bot2", "v1", JobState.RUNNING, ""),
    ]  # fmt: skip
    for n, (name, version, state, error) in enumerate(ends):
        job = Job(id=f"AJ_{n}", dispatch_id="AD_1", agent_name=name, room="r1", room_sid="RM_1")
        job.version, job.state, job.error, job.ended_at = version, state, error, now + n
        job.created_at = now
        recorder.job_changed(job)
    await recorder.flush()
    every = await all_outcomes(engine, now - 3600)
    assert every == {name: await outcomes(engine, name, now - 3600) for name in ("bot1", "bot2")}
    assert every["bot1"]["v1"]["ended"] == 3 and every["bot1"]["v1"]["failed"] == 2
    assert every["bot1"]["v1"]["last_failure"]["error"] == "new"
    assert every["bot1"]["v2"] == {"ended": 1, "failed": 0, "last_failure": None}
    assert (
        every["bot2"]["v1"]["ended"] == 1
        and every["bot2"]["v1"]["last_failure"]["job_id"] == "AJ_4"
    )
    assert await all_outcomes(engine, now + 1) == {}
