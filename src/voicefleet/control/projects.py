"""The server's project: dev credentials, or generated ones kept in the data directory."""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from pathlib import Path

from voicefleet.config import Project, Settings
from voicefleet.errors import FULL_DISK_ERRNOS, CannotStart

DEV_KEY, DEV_SECRET = "devkey", "secret"
CREDENTIALS_FILE = "credentials.json"


def check_data_dir(path: Path) -> None:
    """Make the data dir if need be and prove this process can write in it: a data dir that
    cannot be used is found here, said in one line, not in a traceback from mid-start."""
    hint = "pass --data-dir a folder this user can write (made if it does not exist)"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise CannotStart("the data dir is a file, not a folder", path, hint) from None
    except OSError as e:
        raise CannotStart(f"the data dir cannot be made ({e.strerror})", path, hint) from None
    try:
        # A byte, not an empty file: an empty file needs no free block, so a full disk
        # would pass.
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=path)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        if e.errno in FULL_DISK_ERRNOS:
            raise CannotStart(
                f"the data dir is full ({e.strerror})", path, "free space, then start again"
            ) from None
        raise CannotStart(f"the data dir is not writable ({e.strerror})", path, hint) from None


def load_project(settings: Settings) -> tuple[Project, bool]:
    """The project, and whether its credentials were made just now (to print them once)."""
    sfu = {
        "livekit_url": settings.livekit_url,
        "livekit_api_key": settings.livekit_api_key,
        "livekit_api_secret": settings.livekit_api_secret,
    }
    if settings.dev:
        return Project(name="dev", api_key=DEV_KEY, api_secret=DEV_SECRET, **sfu), False
    path = settings.data_dir / CREDENTIALS_FILE
    if path.exists():
        hint = "restore it from a backup, or move it aside to make new credentials"
        try:
            saved = json.loads(path.read_text())
            return Project(
                name=saved["project"],
                api_key=saved["api_key"],
                api_secret=saved["api_secret"],
                **sfu,
            ), False
        except OSError as e:
            raise CannotStart(
                f"the credentials cannot be read ({e.strerror})", path, hint
            ) from None
        except (ValueError, KeyError, TypeError) as e:
            raise CannotStart(
                f"{path.name} is not a voicefleet credentials file: {e}", path, hint
            ) from None
    project = Project(
        name="default",
        api_key="API" + secrets.token_urlsafe(9),
        api_secret=secrets.token_urlsafe(32),
        **sfu,
    )
    _write_private(
        path,
        json.dumps(
            {"project": project.name, "api_key": project.api_key, "api_secret": project.api_secret},
            indent=2,
        ),
    )
    return project, True


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
