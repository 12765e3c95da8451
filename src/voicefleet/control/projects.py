"""The server's project: dev credentials, or generated ones kept in the data directory."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from voicefleet.config import Project, Settings
from voicefleet.errors import VoicefleetError

DEV_KEY, DEV_SECRET = "devkey", "secret"
CREDENTIALS_FILE = "credentials.json"


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
        try:
            saved = json.loads(path.read_text())
            return Project(
                name=saved["project"],
                api_key=saved["api_key"],
                api_secret=saved["api_secret"],
                **sfu,
            ), False
        except (ValueError, KeyError, TypeError) as e:
            raise VoicefleetError(f"{path} is not a voicefleet credentials file: {e}") from None
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
