"""The errors a user can act on, mapped to HTTP status and Twirp codes in one place."""

from __future__ import annotations

import errno
import math
import os
import sqlite3
from pathlib import Path


class VoicefleetError(Exception):
    """Base of every error voicefleet raises on purpose."""

    status = 500
    twirp_code = "internal"


class AuthError(VoicefleetError):
    """A missing, malformed, expired or wrongly signed token, or one without the needed grant."""

    status = 401
    twirp_code = "unauthenticated"


class PermissionDenied(AuthError):
    """A valid token that lacks the grant this call needs."""

    status = 403
    twirp_code = "permission_denied"


class InvalidRequest(VoicefleetError):
    status = 400
    twirp_code = "invalid_argument"


class NotFound(VoicefleetError):
    status = 404
    twirp_code = "not_found"


class Conflict(VoicefleetError):
    """The request is valid but the state of the thing it names refuses it."""

    status = 409
    twirp_code = "failed_precondition"


class NoCapacity(VoicefleetError):
    """The dispatch queue is full: no worker can take the job and no room is left to wait."""

    status = 429
    twirp_code = "resource_exhausted"


class ProtocolError(VoicefleetError):
    """A worker sent a frame that is not a valid `WorkerMessage`, or sent it out of turn."""

    status = 400
    twirp_code = "malformed"


class BundleRejected(InvalidRequest):
    """An uploaded source bundle is unsafe or too big: path traversal, links out, size limits."""


class BackupRejected(VoicefleetError):
    """A backup archive `vf server restore` will not restore: not a voicefleet backup, damaged,
    unsafe (paths out of the data dir, links, members too big) or too big for the disk."""


class BuildFailed(VoicefleetError):
    """Building a version's environment failed; the log says why. The serving version is kept."""

    status = 422
    twirp_code = "failed_precondition"


FULL_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def full_disk(exc: BaseException) -> str | None:
    """What the system said, if `exc` says a disk (or a quota) is full: an OSError, or SQLite's
    SQLITE_FULL as the store's driver raises it (SQLAlchemy keeps the driver's error in `orig`).
    """
    cause = getattr(exc, "orig", None) or exc
    if isinstance(cause, OSError) and cause.errno in FULL_DISK_ERRNOS:
        return cause.strerror or os.strerror(cause.errno)
    if getattr(cause, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_FULL:
        return str(cause)
    return None


class StorageFull(VoicefleetError):
    """The file system of the data dir is full (or the user's quota is): nothing can be
    written until space is freed; then the request may be retried."""

    status = 503
    twirp_code = "unavailable"

    def __init__(self, data_dir: Path, reason: str) -> None:
        super().__init__(f"the data dir {data_dir} is full ({reason}): free space and retry")


class CannotStart(VoicefleetError):
    """The server cannot start with this data dir or store: what is wrong, where, and a hint
    saying what to do. `vf server` prints these and exits 2, with no traceback."""

    def __init__(self, what: str, where: object, hint: str) -> None:
        super().__init__(f"{what} ({where})")
        self.hint = hint


def check_numbers(what: str, values: dict[str, object], integers: tuple[str, ...] = ()) -> None:
    """Settings read from JSON: each value (None aside) must be a finite number, not a bool,
    and those named in `integers` whole numbers; else InvalidRequest naming them."""
    bad = [
        f"{name} must be {'a whole number' if name in integers else 'a number'} (got {value!r})"
        for name, value in values.items()
        if value is not None
        and (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)  # NaN, or 1e999 read as infinity
            or (name in integers and value != int(value))
        )
    ]
    if bad:
        raise InvalidRequest(f"{what}: {'; '.join(bad)}")
