"""`vf server backup`: a data dir's store and versions in one file.

A backup is a tar.gz holding, in this order:

  manifest.json                              what it holds: format, voicefleet version, when,
                                             counts, and the size and sha256 of every file
  voicefleet.db                              the SQLite store, copied with SQLite's online
                                             backup API: one consistent snapshot while the
                                             server serves and writes (WAL: it waits for nobody)
  agents/<agent id>/<version>/bundle.tar.gz  each version's sources as uploaded
  agents/<agent id>/<version>/build.log      and its build log

Kept out on purpose: `secrets.key`, which decrypts the secrets in the store, and
`credentials.json`, the project's API key and secret. A backup without them holds nothing
readable to whoever gets a copy; they are kept apart, once (they do not change). Left out as
derived or transient: built environments (`envs/`: rebuilt from the bundles at the first start,
by dependency digest), the instances' logs, uploads in progress, the flags SDK (`sdk/`, written
at every start) and the instances' flag caches (refreshed from the store).

Its restore, into a new data dir: voicefleet.control.restore.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
import shutil
import sqlite3
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import Connection

from voicefleet import __version__
from voicefleet.control.projects import CREDENTIALS_FILE
from voicefleet.errors import VoicefleetError
from voicefleet.fleet.paths import Paths
from voicefleet.store.models import AgentRow, FlagRow, SecretRow, VersionRow
from voicefleet.store.secrets import KEY_FILE

FORMAT, FORMAT_VERSION = "voicefleet-backup", 1
MANIFEST, DB_FILE = "manifest.json", "voicefleet.db"
KEPT_APART = (KEY_FILE, CREDENTIALS_FILE)
VERSION_FILE = re.compile(
    r"agents/(CA_[A-Za-z0-9]{1,40})/(v[1-9][0-9]{0,8})/(bundle\.tar\.gz|build\.log)"
)


@dataclass(frozen=True)
class Contents:
    """What a store holds, as the command lines report it."""

    agents: int
    versions: list[tuple[str, str]]  # (agent id, version)
    secrets: int
    flags: int
    revision: str

    def summary(self) -> str:
        return (
            f"{self.agents} agent(s), {len(self.versions)} version(s), {self.secrets} secret(s) "
            f"(encrypted), {self.flags} flag(s)"
        )


@dataclass(frozen=True)
class BackupReport:
    path: Path
    bytes: int
    contents: Contents
    missing: list[str]  # versions whose bundle was not in the data dir
    kept_apart: list[Path]  # the files of the data dir to keep a copy of, apart


# -- backup -------------------------------------------------------------------------------------


def backup(data_dir: Path, out: Path) -> BackupReport:
    """Write a backup of the data dir to `out` (replaced atomically if it exists)."""
    db = data_dir / DB_FILE
    if not db.is_file():
        raise VoicefleetError(
            f"no voicefleet store in {data_dir} ({DB_FILE} is not there): is it a server's "
            "--data-dir? A PostgreSQL store is backed up with pg_dump (docs/operations.md)"
        )
    out = out.absolute()
    if out.is_dir():
        raise VoicefleetError(f"{out} is a folder: give the backup file's name")
    if not out.parent.is_dir():
        raise VoicefleetError(f"{out.parent} does not exist: make it first")
    paths = Paths(data_dir)
    with tempfile.TemporaryDirectory(prefix=".vf-backup-", dir=out.parent) as work:
        snapshot = Path(work) / DB_FILE
        _snapshot(db, snapshot)
        contents = _contents(snapshot)
        files: list[tuple[str, Path]] = [(DB_FILE, snapshot)]
        missing = []
        for agent_id, version in contents.versions:
            bundle = paths.bundle(agent_id, version)
            if not bundle.is_file():
                missing.append(f"{agent_id} {version}")
                continue
            files.append((f"agents/{agent_id}/{version}/bundle.tar.gz", bundle))
            log = paths.build_log(agent_id, version)
            if log.is_file():
                files.append((f"agents/{agent_id}/{version}/build.log", _frozen(log, Path(work))))
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "voicefleet": __version__,
            "created_at": time.time(),
            "data_dir": str(data_dir),
            "schema_revision": contents.revision,
            "counts": {
                "agents": contents.agents,
                "versions": len(contents.versions),
                "secrets": contents.secrets,
                "flags": contents.flags,
            },
            "missing_bundles": missing,
            "kept_apart": [name for name in KEPT_APART if (data_dir / name).exists()],
            "files": {name: {"size": p.stat().st_size, "sha256": _sha256(p)} for name, p in files},
        }
        tmp = Path(work) / "backup.tar.gz"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # it holds the store
        with (
            os.fdopen(fd, "wb") as raw,
            tarfile.open(fileobj=raw, mode="w:gz", compresslevel=6) as tar,
        ):
            data = json.dumps(manifest, indent=2).encode()
            tar.addfile(_info(MANIFEST, len(data)), io.BytesIO(data))
            for name, path in files:
                with open(path, "rb") as f:
                    tar.addfile(_info(name, manifest["files"][name]["size"]), f)
        os.replace(tmp, out)
    return BackupReport(
        path=out,
        bytes=out.stat().st_size,
        contents=contents,
        missing=missing,
        kept_apart=[data_dir / name for name in manifest["kept_apart"]],
    )


def _snapshot(db: Path, dest: Path) -> None:
    """A consistent copy of the live store. One step of SQLite's backup API copies every page
    inside one read transaction: in WAL mode the server's writes go on meanwhile, unseen."""
    source = sqlite3.connect(db, timeout=30)
    try:
        target = sqlite3.connect(dest)
        try:
            source.backup(target)
            target.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
            (check,) = target.execute("PRAGMA quick_check").fetchone()
        finally:
            target.close()
    finally:
        source.close()
    if check != "ok":
        raise VoicefleetError(f"the store's snapshot fails SQLite's check ({check}): {db}")


def _frozen(log: Path, work: Path) -> Path:
    """A copy of a file that may still grow (a build log), so the size the manifest gives is
    the size the archive holds."""
    copy = work / f"log-{secrets.token_hex(6)}"
    shutil.copyfile(log, copy)
    return copy


def _contents(db: Path) -> Contents:
    engine = create_engine(f"sqlite:///{db}")
    try:
        with engine.connect() as conn:
            return count(conn)
    finally:
        engine.dispose()


def count(conn: Connection) -> Contents:
    def count(column: Any) -> int:
        return int(conn.execute(select(func.count(column))).scalar_one())

    versions = conn.execute(select(VersionRow.agent_id, VersionRow.version)).all()
    revision = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
    return Contents(
        agents=count(AgentRow.id),
        versions=sorted((a, v) for a, v in versions),
        secrets=count(SecretRow.name),
        flags=count(FlagRow.key),
        revision=str(revision or ""),
    )


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o600, int(time.time())
    return info


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
