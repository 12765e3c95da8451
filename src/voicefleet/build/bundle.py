"""The source bundle: a deterministic tar.gz of an agent folder, and its safe extraction.

`create_bundle` honours .gitignore and .dockerignore and always leaves out VCS, virtual
environments and caches; the same files give the same bytes (sorted, zeroed mtimes and owners),
so the bundle's sha256 is the version's source digest. `extract_bundle` trusts nothing: no
absolute paths, no `..`, no links, no devices, and limits on sizes and file count, counted
while streaming so a gzip bomb stops early. It extracts beside `dest` and renames at the end,
so a rejected bundle leaves nothing behind. Its errors name paths inside the bundle, never
where the server keeps it; a full disk is no fault of the bundle's and is raised as it is.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import pathspec

from voicefleet.errors import FULL_DISK_ERRNOS, BundleRejected, VoicefleetError

MAX_COMPRESSED_BYTES = 50 * 2**20
MAX_BYTES = 200 * 2**20
MAX_FILES = 20_000
MAX_NAME = 255 * 4
ALWAYS_EXCLUDED = [".git/", ".venv/", "venv/", "__pycache__/", "*.pyc", ".voicefleet/", ".env"]
IGNORE_FILES = (".gitignore", ".dockerignore")


@dataclass(frozen=True)
class BundleInfo:
    files: int
    bytes: int
    digest: str


def _ignore_spec(folder: Path) -> pathspec.PathSpec:  # type: ignore[type-arg, unused-ignore]
    lines = list(ALWAYS_EXCLUDED)
    for name in IGNORE_FILES:
        path = folder / name
        if path.exists():
            lines += path.read_text(errors="replace").splitlines()
    return pathspec.PathSpec.from_lines("gitwildmatch", lines)


def bundle_files(folder: Path) -> list[Path]:
    """The files a bundle of `folder` holds, relative to it, sorted."""
    spec = _ignore_spec(folder)
    found = []
    for root, dirs, files in os.walk(folder):
        rel_root = Path(root).relative_to(folder)
        dirs[:] = sorted(d for d in dirs if not spec.match_file(f"{rel_root / d}/"))
        for name in files:
            rel = rel_root / name
            if not spec.match_file(str(rel)):
                found.append(rel)
    return sorted(found)


def create_bundle(
    folder: Path, out: Path, progress: Callable[[int, int], None] | None = None
) -> BundleInfo:
    """Write the bundle of `folder` to `out`; `progress(done, total)` is called per file."""
    folder = folder.resolve()
    if not folder.is_dir():
        raise BundleRejected(f"{folder} is not a folder")
    files = bundle_files(folder)
    total = sum((folder / f).lstat().st_size for f in files)
    done = 0
    with open(out, "wb") as raw:
        # mtime=0 in the gzip header too: the same files give the same digest.
        with gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz:
            with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for rel in files:
                    path = folder / rel
                    if path.is_symlink():
                        target = path.resolve()
                        if not target.is_relative_to(folder):
                            raise BundleRejected(f"{rel} is a link out of the folder ({target})")
                        path = target  # stored as the file it points to
                    if not path.is_file():
                        continue
                    info = tarfile.TarInfo(rel.as_posix())
                    info.size = path.stat().st_size
                    info.mode = 0o755 if os.access(path, os.X_OK) else 0o644
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
                    done += info.size
                    if progress is not None:
                        progress(done, total)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    return BundleInfo(files=len(files), bytes=total, digest=digest)


@dataclass(frozen=True)
class ExtractInfo:
    files: int
    bytes: int
    digest: str


class _Counting(io.RawIOBase):
    """Reads the compressed stream, hashing it and stopping past `limit` bytes."""

    def __init__(self, src: BinaryIO, limit: int) -> None:
        self.src, self.limit, self.read_bytes = src, limit, 0
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.src.read(len(buffer))
        self.read_bytes += len(data)
        if self.read_bytes > self.limit:
            raise BundleRejected(f"bundle is over the {self.limit // 2**20} MB upload limit")
        self.sha.update(data)
        buffer[: len(data)] = data
        return len(data)


MAX_HEADER = 1 << 20  # a PAX or GNU long-name header's own payload


class _BoundedHeaders(tarfile.TarInfo):
    """tarfile reads a PAX or GNU long-name header's whole payload into memory before any
    member is seen: a header claiming gigabytes of zeros, a few kilobytes gzipped, would take
    gigabytes of memory. Refuse such headers before they are read."""

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in HEADER_TYPES and self.size > MAX_HEADER:
            raise BundleRejected(f"bundle has a tar header of {self.size} bytes (a bomb?)")
        member: tarfile.TarInfo = super()._proc_member(tar)  # type: ignore[misc]
        return member


HEADER_TYPES = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)


def _check_member(member: tarfile.TarInfo) -> PurePosixPath:
    name = member.name
    if not name or "\0" in name or len(name) > MAX_NAME:
        raise BundleRejected(f"bundle member {name[:80]!r} has an invalid name")
    path = PurePosixPath(name)
    if path.is_absolute() or name.startswith(("/", "\\")):
        raise BundleRejected(f"bundle member {name!r} is an absolute path")
    if ".." in path.parts:
        raise BundleRejected(f"bundle member {name!r} leaves the folder ('..')")
    if member.issym() or member.islnk():
        raise BundleRejected(f"bundle member {name!r} is a link ({member.linkname!r})")
    if not (member.isfile() or member.isdir()):
        raise BundleRejected(f"bundle member {name!r} is not a regular file or folder")
    return path


def extract_bundle(
    src: Path | BinaryIO,
    dest: Path,
    *,
    max_bytes: int = MAX_BYTES,
    max_files: int = MAX_FILES,
    max_compressed: int = MAX_COMPRESSED_BYTES,
) -> ExtractInfo:
    """Extract a bundle into `dest` (which must not exist), or raise BundleRejected."""
    if dest.exists():  # the caller's mistake, not the bundle's
        raise VoicefleetError("the new version's source folder already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest.parent))
    owned = open(src, "rb") if isinstance(src, Path) else None
    try:
        counting = _Counting(owned or src, max_compressed)  # type: ignore[arg-type]
        files = entries = size = 0
        try:
            stream = io.BufferedReader(counting)
            with tarfile.open(fileobj=stream, mode="r|gz", tarinfo=_BoundedHeaders) as tar:
                for member in tar:
                    rel = _check_member(member)
                    target = tmp.joinpath(*rel.parts)
                    entries += 1  # folders count: a million empty ones would eat the inodes
                    if entries > max_files:
                        raise BundleRejected(f"bundle has more than {max_files} files and folders")
                    try:
                        if member.isdir():
                            target.mkdir(parents=True, exist_ok=True)
                            continue
                        files += 1
                        target.parent.mkdir(parents=True, exist_ok=True)
                        reader = tar.extractfile(member)
                        assert reader is not None
                        with open(target, "wb") as out:
                            # Count what is written, not what the header claims.
                            while chunk := reader.read(1 << 16):
                                size += len(chunk)
                                if size > max_bytes:
                                    raise BundleRejected(
                                        f"bundle unpacks to more than {max_bytes // 2**20} MB"
                                    )
                                out.write(chunk)
                        os.chmod(target, 0o755 if member.mode & 0o100 else 0o644)
                    except OSError as e:
                        # Names that clash (a file under a file, a folder where a file is) or
                        # that are too long: the bundle's fault. Its strerror has no path.
                        if e.errno in FULL_DISK_ERRNOS:
                            raise
                        raise BundleRejected(
                            f"bundle member {member.name[:120]!r} cannot be unpacked: {e.strerror}"
                        ) from None
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:  # BadGzipFile: OSError
            if isinstance(e, OSError) and e.errno in FULL_DISK_ERRNOS:
                raise
            reason = e.strerror if isinstance(e, OSError) and e.strerror else e
            raise BundleRejected(f"not a tar.gz bundle: {reason}") from None
        if files == 0:
            raise BundleRejected("bundle holds no files")
        tmp.rename(dest)
        return ExtractInfo(files=files, bytes=size, digest=counting.sha.hexdigest())
    finally:
        if owned is not None:
            owned.close()
        shutil.rmtree(tmp, ignore_errors=True)
