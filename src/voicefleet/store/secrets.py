"""Secrets at rest: Fernet-encrypted with a key kept in the data directory (mode 0600).

The key is not in backups (`vf server backup`): it is kept apart from them, so a stolen backup
holds no readable secret. A server whose store holds secrets refuses to start without the key
that opens them, rather than make a new key and leave every secret unreadable.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from voicefleet.errors import CannotStart, VoicefleetError
from voicefleet.store.models import SecretRow

KEY_FILE = "secrets.key"


class SecretBox:
    def __init__(self, key: bytes) -> None:
        self._key = key
        self._fernet = Fernet(key)

    @classmethod
    def open(cls, data_dir: Path) -> SecretBox:
        path = data_dir / KEY_FILE
        if not path.exists():
            data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(Fernet.generate_key())
        return cls(path.read_bytes().strip())

    def derive(self, purpose: str) -> bytes:
        """A key of its own for `purpose` (HMAC-SHA256 of it under the file's key): kept, as
        the file is, out of the database."""
        return hmac.new(self._key, f"voicefleet {purpose}".encode(), hashlib.sha256).digest()

    def seal(self, value: str | bytes) -> bytes:
        return self._fernet.encrypt(value.encode() if isinstance(value, str) else value)

    def opens(self, sealed: bytes) -> bool:
        try:
            self._fernet.decrypt(sealed)
        except InvalidToken:
            return False
        return True

    def open_value(self, sealed: bytes) -> str:
        return self.open_bytes(sealed).decode()

    def open_bytes(self, sealed: bytes) -> bytes:
        """A file secret's content: bytes, as it was uploaded."""
        try:
            return self._fernet.decrypt(sealed)
        except InvalidToken:
            raise VoicefleetError(
                f"a secret cannot be decrypted with {KEY_FILE}: was the key file replaced?"
            ) from None


async def check_secrets_key(url: str, data_dir: Path) -> None:
    """Refuse to start (CannotStart) when the store holds secrets that no key here opens: the
    key file is missing (a restored backup without it) or is another data dir's."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            sealed = list((await conn.execute(select(SecretRow.value))).scalars())
    finally:
        await engine.dispose()
    if not sealed:
        return
    path = data_dir / KEY_FILE
    lost = (
        "if that key is lost, so are the secrets: restore a backup with "
        "`vf server restore --drop-secrets`, then set them again"
    )
    if not path.exists():
        raise CannotStart(
            f"the store holds {len(sealed)} encrypted secret(s) and {KEY_FILE} is missing: "
            "without it they cannot be decrypted",
            path,
            f"copy the {KEY_FILE} of the data dir they were set in to {path} (mode 0600); {lost}",
        )
    try:
        box = SecretBox(path.read_bytes().strip())
    except (ValueError, OSError) as e:
        raise CannotStart(f"{KEY_FILE} is not a usable key ({e})", path, lost) from None
    if not any(box.opens(value) for value in sealed):
        raise CannotStart(
            f"{KEY_FILE} decrypts none of the store's {len(sealed)} secret(s): it is not the key "
            "they were encrypted with",
            path,
            f"copy the {KEY_FILE} of the data dir they were set in to {path}; {lost}",
        )
