"""`vf server restore`: a backup (voicefleet.control.backup says what it holds) into a new
data dir.

It trusts nothing in the archive: only the names a backup has, regular files only, sizes
bounded and checked against the manifest's sha256, each bundle unpacked by the same code that
takes uploads (voicefleet.build.bundle). It unpacks into a folder inside the data dir and moves
things into place only once everything is checked, so a refused archive leaves the data dir as
it was. Sessions the snapshot shows open were cut from it: they end as failed, so that the
restored server does not dispatch calls that are long over.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, delete, func, select, update
from sqlalchemy.engine import Connection

from voicefleet import __version__
from voicefleet.build.bundle import MAX_COMPRESSED_BYTES, extract_bundle
from voicefleet.control.backup import (
    DB_FILE,
    FORMAT,
    FORMAT_VERSION,
    KEPT_APART,
    MANIFEST,
    VERSION_FILE,
    Contents,
    count,
)
from voicefleet.dispatch.jobs import ENDED, JobState
from voicefleet.errors import FULL_DISK_ERRNOS, BackupRejected, BundleRejected, VoicefleetError
from voicefleet.store.db import alembic_config
from voicefleet.store.models import AgentRow, JobRow, SecretRow
from voicefleet.store.secrets import KEY_FILE, SecretBox

# What one member may be: past these a member is refused before a byte of it is written.
MAX_MANIFEST = 4 << 20
MAX_BUILD_LOG = 256 << 20
MAX_DATABASE = 1 << 40
MAX_MEMBERS = 200_000
OPEN_AT_BACKUP = "the server was restored from a backup taken while this session was open"


@dataclass(frozen=True)
class RestoreReport:
    data_dir: Path
    source: str  # the data dir the backup was taken of
    taken_at: float
    contents: Contents
    sessions_closed: int
    dropped_secrets: dict[str, list[str]] = field(default_factory=dict)  # agent name -> names
    missing: list[str] = field(default_factory=list)  # KEPT_APART files the target lacks
    key_opens: bool | None = None  # None: no key there, or no secret to open


def restore(
    archive: Path, data_dir: Path, *, force: bool = False, drop_secrets: bool = False
) -> RestoreReport:
    """Restore a backup into `data_dir`: new or empty, or anything with `force` (its store and
    the backup's versions are replaced; its secrets.key and credentials are kept)."""
    if not archive.is_file():
        raise VoicefleetError(f"{archive} is not a file")
    if data_dir.exists() and not data_dir.is_dir():
        raise VoicefleetError(f"{data_dir} is a file, not a folder")
    made = not data_dir.exists()
    if not made and any(data_dir.iterdir()) and not force:
        raise VoicefleetError(
            f"{data_dir} is not empty: restore into a new or empty folder, or pass --force to "
            "replace its store and versions with the backup's (stop its server first)"
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".restore-", dir=data_dir))
    try:
        manifest = _unpack(archive, stage, shutil.disk_usage(data_dir).free)
        db = stage / DB_FILE
        engine = create_engine(f"sqlite:///{db}")
        try:
            with engine.begin() as conn:
                _check_schema(conn)
                closed = _close_open_sessions(conn)
                dropped = _drop_secrets(conn) if drop_secrets else {}
                contents = count(conn)
                sealed = list(conn.execute(select(SecretRow.value)).scalars())
        finally:
            engine.dispose()
        version_dirs = _unpack_bundles(stage)
        _into_place(stage, data_dir, version_dirs)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if made:
            shutil.rmtree(data_dir, ignore_errors=True)  # only what this restore made
        raise
    shutil.rmtree(stage, ignore_errors=True)
    key_opens = None
    if sealed and (data_dir / KEY_FILE).is_file():
        try:
            box = SecretBox((data_dir / KEY_FILE).read_bytes().strip())
            key_opens = any(box.opens(s) for s in sealed)
        except ValueError:
            key_opens = False
    return RestoreReport(
        data_dir=data_dir,
        source=str(manifest.get("data_dir", "")),
        taken_at=float(manifest.get("created_at", 0.0)),
        contents=contents,
        sessions_closed=closed,
        dropped_secrets=dropped,
        missing=[
            name
            for name in manifest.get("kept_apart", [])
            if isinstance(name, str) and name in KEPT_APART and not (data_dir / name).exists()
        ],
        key_opens=key_opens,
    )


class _Headers(tarfile.TarInfo):
    """A PAX or GNU long-name header's payload is read into memory whole, before any member
    is seen: one claiming gigabytes is refused first (as voicefleet.build.bundle does)."""

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _HEADER_TYPES and self.size > 1 << 20:
            raise BackupRejected(f"the archive has a tar header of {self.size} bytes (a bomb?)")
        member: tarfile.TarInfo = super()._proc_member(tar)  # type: ignore[misc]
        return member


_HEADER_TYPES = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)


def _limit(name: str) -> int:
    if name == MANIFEST:
        return MAX_MANIFEST
    if name == DB_FILE:
        return MAX_DATABASE
    return MAX_COMPRESSED_BYTES if name.endswith("bundle.tar.gz") else MAX_BUILD_LOG


def _check_name(member: tarfile.TarInfo) -> str:
    name = member.name
    shown = repr(name[:200])
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or name.startswith("\\"):
        raise BackupRejected(f"the archive's member {shown} leads out of the data dir")
    if member.issym() or member.islnk():
        raise BackupRejected(f"the archive's member {shown} is a link ({member.linkname!r})")
    if not member.isfile():
        raise BackupRejected(f"the archive's member {shown} is not a regular file")
    if name not in (MANIFEST, DB_FILE) and not VERSION_FILE.fullmatch(name):
        raise BackupRejected(f"the archive's member {shown} is not part of a voicefleet backup")
    return name


def _read_manifest(data: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BackupRejected(f"the archive's manifest is not JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupRejected("not a voicefleet backup (its manifest is of another format)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BackupRejected(
            f"a backup of format {manifest.get('format_version')!r} (made by voicefleet "
            f"{manifest.get('voicefleet')}); this voicefleet ({__version__}) restores format "
            f"{FORMAT_VERSION}"
        )
    if not (
        isinstance(manifest.get("created_at", 0), int | float)
        and isinstance(manifest.get("data_dir", ""), str)
        and isinstance(manifest.get("kept_apart", []), list)
    ):
        raise BackupRejected("the archive's manifest is invalid (created_at, data_dir, kept_apart)")
    files = manifest.get("files")
    if not isinstance(files, dict) or DB_FILE not in files:
        raise BackupRejected("the archive's manifest lists no store")
    for name, entry in files.items():
        if name != DB_FILE and not VERSION_FILE.fullmatch(name):
            raise BackupRejected(f"the manifest lists {name[:200]!r}, no part of a backup")
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("size"), int)
            and 0 <= entry["size"] <= _limit(name)
            and isinstance(entry.get("sha256"), str)
        ):
            raise BackupRejected(f"the manifest's entry of {name!r} is invalid or too big")
    return manifest


def _unpack(archive: Path, stage: Path, free: int) -> dict[str, Any]:
    """The archive's files into `stage`, each checked; its manifest."""
    manifest: dict[str, Any] | None = None
    seen: set[str] = set()
    try:
        with tarfile.open(archive, mode="r|gz", tarinfo=_Headers) as tar:
            for n, member in enumerate(tar):
                if manifest is None and member.name != MANIFEST:
                    raise BackupRejected(
                        f"not a voicefleet backup: it starts with {member.name[:200]!r}, "
                        f"not {MANIFEST}"
                    )
                name = _check_name(member)
                if n >= MAX_MEMBERS or name in seen:
                    raise BackupRejected(f"the archive holds {name!r} twice, or too many files")
                seen.add(name)
                if member.size > _limit(name):
                    raise BackupRejected(
                        f"the archive's member {name!r} is {member.size} bytes: more than a "
                        f"voicefleet backup's {name.rsplit('/', 1)[-1]} can be ({_limit(name)})"
                    )
                reader = tar.extractfile(member)
                assert reader is not None  # a regular file
                if manifest is None:
                    manifest = _read_manifest(reader.read())
                    need = sum(entry["size"] for entry in manifest["files"].values())
                    if need > free:
                        raise BackupRejected(
                            f"the backup needs {need >> 20} MB and the data dir's disk has "
                            f"{free >> 20} MB free"
                        )
                    continue
                entry = manifest["files"].get(name)
                if entry is None or entry["size"] != member.size:
                    raise BackupRejected(f"the archive's member {name!r} is not in its manifest")
                _write(reader, stage / name, entry)
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise BackupRejected(f"not a readable tar.gz, or a truncated one ({e})") from None
    except OSError as e:
        if e.errno in FULL_DISK_ERRNOS:
            raise VoicefleetError(f"the data dir's disk is full ({e.strerror})") from None
        raise BackupRejected(f"not a readable tar.gz, or a truncated one ({e})") from None
    if manifest is None:
        raise BackupRejected("not a voicefleet backup: the archive is empty")
    absent = sorted(set(manifest["files"]) - seen)
    if absent:
        raise BackupRejected(f"the archive is incomplete: {', '.join(absent[:5])} missing")
    return manifest


def _write(reader: IO[bytes], target: Path, entry: dict[str, Any]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    h, size = hashlib.sha256(), 0
    with open(target, "xb") as out:
        while chunk := reader.read(1 << 20):
            size += len(chunk)
            if size > entry["size"]:
                raise BackupRejected(f"{target.name} is longer than its manifest says")
            h.update(chunk)
            out.write(chunk)
    if h.hexdigest() != entry["sha256"]:
        raise BackupRejected(f"{target.name} is damaged: its sha256 is not the manifest's")
    os.chmod(target, 0o600 if target.name == DB_FILE else 0o644)


def _check_schema(conn: Connection) -> None:
    try:
        revision = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
        conn.execute(select(func.count(AgentRow.id))).scalar_one()
    except Exception as e:  # not SQLite, not voicefleet's: the driver says which
        cause = getattr(e, "orig", None) or e
        raise BackupRejected(f"the backup's store is not a voicefleet database ({cause})") from None
    check = conn.exec_driver_sql("PRAGMA quick_check").scalar()
    if check != "ok":
        raise BackupRejected(f"the backup's store is damaged (SQLite's check: {check})")
    known = {s.revision for s in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
    if revision not in known:
        raise BackupRejected(
            f"the backup's store has schema {revision!r}, which voicefleet {__version__} does "
            "not know: restore it with the voicefleet that made it (a newer one?)"
        )


def _close_open_sessions(conn: Connection) -> int:
    result = conn.execute(
        update(JobRow)
        .where(JobRow.state.not_in([str(s) for s in ENDED]))
        .values(state=str(JobState.FAILED), error=OPEN_AT_BACKUP, ended_at=time.time())
    )
    return int(result.rowcount or 0)


def _drop_secrets(conn: Connection) -> dict[str, list[str]]:
    rows = conn.execute(
        select(AgentRow.name, SecretRow.name).join(AgentRow, AgentRow.id == SecretRow.agent_id)
    ).all()
    conn.execute(delete(SecretRow))
    dropped: dict[str, list[str]] = {}
    for agent, name in rows:
        dropped.setdefault(agent, []).append(name)
    return {agent: sorted(names) for agent, names in sorted(dropped.items())}


def _unpack_bundles(stage: Path) -> list[Path]:
    """Each version's sources from its bundle; the version folders (relative to the stage)."""
    found = []
    for bundle in sorted(stage.glob("agents/*/*/bundle.tar.gz")):
        vdir = bundle.parent
        try:
            extract_bundle(bundle, vdir / "src")
        except BundleRejected as e:
            agent, version = vdir.parent.name, vdir.name
            raise BackupRejected(f"the bundle of {agent} {version} is refused: {e}") from None
        found.append(vdir.relative_to(stage))
    for log in stage.glob("agents/*/*/build.log"):  # a log without its bundle is no version
        if log.parent.relative_to(stage) not in found:
            log.unlink()
    return found


def _into_place(stage: Path, data_dir: Path, version_dirs: list[Path]) -> None:
    """Move the checked files into the data dir. A store left there (--force) goes, with its
    WAL: SQLite would replay an old write-ahead log into the restored database."""
    for suffix in ("-wal", "-shm", "-journal", ""):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(data_dir / f"{DB_FILE}{suffix}")
    os.replace(stage / DB_FILE, data_dir / DB_FILE)
    for rel in version_dirs:
        target = data_dir / rel
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(stage / rel, target)
