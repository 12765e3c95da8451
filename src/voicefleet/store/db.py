"""The store's engine: SQLite under the data directory by default, PostgreSQL by URL.

The schema is Alembic's: every start upgrades the database to the newest migrations.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.util import CommandError
from sqlalchemy import Connection, event, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from voicefleet import __version__
from voicefleet.errors import CannotStart, full_disk

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def _upgrade(connection: Connection) -> None:
    # Every head: migrations written side by side (each revising the same parent) need no
    # merge revision to be applied together.
    command.upgrade(alembic_config(connection), "heads")


def _sqlite_pragmas(dbapi_connection: object, _record: object) -> None:
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    # WAL: readers (the API) never block the recorder's writes; NORMAL sync is safe with WAL.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


async def open_engine(url: str) -> AsyncEngine:
    engine = create_async_engine(url)
    if engine.dialect.name == "sqlite":
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_upgrade)
    except BaseException:
        await engine.dispose()
        raise
    return engine


async def check_store(url: str) -> None:
    """Open the store and bring its schema up to date once, before the server starts, so that
    a store that cannot be used stops the start with one line saying what, where and what to
    do (CannotStart), not with a traceback from inside the server's start-up."""
    try:
        engine = await open_engine(url)
    except (SQLAlchemyError, CommandError, OSError) as e:
        raise _cannot_open(url, e) from None
    await engine.dispose()


def _cannot_open(url: str, e: Exception) -> CannotStart:
    try:
        parsed = make_url(url)
    except SQLAlchemyError:  # not a URL at all
        return CannotStart(
            f"the store cannot be opened ({e})",
            "--database-url",
            "pass a URL such as postgresql+asyncpg://user@host/db, or none for SQLite",
        )
    sqlite = parsed.get_backend_name() == "sqlite"
    where = parsed.database if sqlite else parsed.render_as_string(hide_password=True)
    cause = getattr(e, "orig", None) or e
    reason = str(cause).strip()
    code = getattr(cause, "sqlite_errorcode", 0) & 0xFF  # the primary code of an extended one
    if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return CannotStart(
            f"the database is corrupt or not a voicefleet database ({reason})",
            where,
            "restore it from a backup, or move it aside to start with an empty one",
        )
    if full_disk(e) is not None:
        return CannotStart(
            f"the database's disk is full ({reason})", where, "free space, then start again"
        )
    if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM):
        return CannotStart(
            f"the database cannot be written ({reason})",
            where,
            "make it and its folder writable by this user, or pass another --data-dir",
        )
    if isinstance(e, CommandError):  # a migration this voicefleet does not have
        return CannotStart(
            f"the database's schema is not one voicefleet {__version__} knows ({reason})",
            where,
            "run the voicefleet that last used it (a newer one?), or restore a backup",
        )
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return CannotStart(
            f"the database is held by another process ({reason})",
            where,
            "stop the other process using it (another vf server with this data dir?)",
        )
    if sqlite:
        return CannotStart(
            f"the database cannot be opened ({reason})",
            where,
            "restore it from a backup, or move it aside to start with an empty one",
        )
    return CannotStart(
        f"the store cannot be opened ({reason})",
        where,
        "check --database-url (VF_DATABASE_URL) and that the database server is up",
    )
