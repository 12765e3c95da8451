"""Secrets at rest: Fernet-encrypted with a key kept in the data directory (mode 0600)."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from voicefleet.errors import VoicefleetError

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
