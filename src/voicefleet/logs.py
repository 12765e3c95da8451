"""One line per event that matters, with its ids as key=value pairs."""

from __future__ import annotations

import logging
import re
import sys

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = " ".join(
            f"{k}={v}" for k, v in record.__dict__.items() if k not in _STANDARD and v is not None
        )
        return f"{line} {extras}" if extras else line


def setup(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("voicefleet")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


class RedactCredentials(logging.Filter):
    """Credentials never reach a log: the value of an Authorization header (uvicorn logs a
    WebSocket handshake's headers at debug level) and tokens in query strings."""

    _HEADER = re.compile(r"(?i)(authorization:\s*\w+\s+)\S+")
    _QUERY = re.compile(r"(?i)((?:access_token|worker_token|token)=)[^&\s\"']+")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = self._QUERY.sub(r"\1[redacted]", self._HEADER.sub(r"\1[redacted]", message))
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def redact(*logger_names: str) -> None:
    """Put `RedactCredentials` on every handler of these loggers (and voicefleet's own)."""
    redactor = RedactCredentials()
    for name in ("voicefleet", *logger_names):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(redactor)
