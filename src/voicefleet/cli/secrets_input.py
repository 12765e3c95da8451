"""Secrets as `vf agent` takes them (`--secrets`, `--secrets-file`, `--secret-mount`), read and
checked before anything is sent: a bad line or a missing file stores nothing.

As `lk agent`: `--secrets` takes KEY=VALUE (repeatable; also several in one, comma-separated:
`A=1,B=2`, split only before a comma followed by NAME=, so a value may hold commas; one holding
`,NAME=` goes in a file) and wins over `--secrets-file`; an empty value in the file is an error
unless `--ignore-empty-secrets`; LIVEKIT_URL, LIVEKIT_API_KEY and LIVEKIT_API_SECRET are skipped
(voicefleet sets them for each instance); a mounted file is named by its own file name and is at
most 1 MiB.
"""

from __future__ import annotations

import base64
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

from dotenv import dotenv_values
from dotenv.parser import parse_stream

# Set by voicefleet for each instance: a secret of that name would be overridden anyway.
IGNORED = ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
FILE_NAME = re.compile(r"[A-Za-z0-9._-]{1,200}")
MAX_FILE = 1024 * 1024
MAX_FILES_TOTAL = 10 * MAX_FILE  # base64 in a request the server takes up to 16 MiB
# A comma that starts another NAME=VALUE in one --secrets.
_NEXT_PAIR = re.compile(r",(?=[A-Za-z_][A-Za-z0-9_]*=)")


class BadSecrets(ValueError):
    """The secrets given cannot be used; the message says which and why (never a value)."""


@dataclass
class SecretsInput:
    env: dict[str, str] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # ignored names, empty values skipped

    def __bool__(self) -> bool:
        return bool(self.env or self.files)

    def body(self, overwrite: bool = False) -> dict[str, object]:
        """The request body of PUT /agents/{agent}/secrets."""
        return {
            "secrets": self.env,
            "files": {n: base64.b64encode(c).decode() for n, c in self.files.items()},
            "overwrite": overwrite,
        }


def read_env_file(
    path: Path, allow_empty: bool = False, ignore_empty: bool = False
) -> SecretsInput:
    """A .env file of KEY=VALUE lines (comments, blank lines, `export`, quotes as python-dotenv
    reads them). A line that is not KEY=VALUE is an error naming its line number; an empty
    value is one unless `allow_empty` (kept) or `ignore_empty` (skipped)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise BadSecrets(f"no secrets file {path}") from None
    except IsADirectoryError:
        raise BadSecrets(f"secrets file {path} is a folder") from None
    except UnicodeDecodeError:
        raise BadSecrets(f"secrets file {path} is not text (UTF-8)") from None
    except OSError as e:
        raise BadSecrets(f"cannot read secrets file {path}: {e.strerror}") from None
    bad = [
        b.original.line
        for b in parse_stream(io.StringIO(text))
        if b.error or (b.key is not None and b.value is None)  # "NAME" alone
    ]
    if bad:
        lines = ", ".join(str(n) for n in bad[:10]) + (" …" if len(bad) > 10 else "")
        raise BadSecrets(
            f"secrets file {path}: line{'s' if len(bad) > 1 else ''} {lines} "
            "not KEY=VALUE; nothing was stored"
        )
    out = SecretsInput()
    for name, value in dotenv_values(stream=io.StringIO(text)).items():
        if not ENV_NAME.fullmatch(name):
            raise BadSecrets(f"secrets file {path}: '{name}' is not a valid variable name")
        if not value:
            if ignore_empty:
                out.skipped.append(name)
                continue
            if not allow_empty:
                raise BadSecrets(
                    f"secrets file {path}: {name} is empty; give it a value, remove it, or pass "
                    "--ignore-empty-secrets"
                )
        out.env[name] = value or ""
    return out


def parse_pairs(pairs: list[str]) -> dict[str, str]:
    values: dict[str, str] = {}
    for given in pairs:
        for pair in _NEXT_PAIR.split(given):
            name, sep, value = pair.partition("=")
            if not sep or not ENV_NAME.fullmatch(name):
                raise BadSecrets(f"'{name if not sep else name + '='}…' is not KEY=VALUE")
            values[name] = value
    return values


def read_mount(path: Path) -> tuple[str, bytes]:
    """A file to deliver as a secret file: (its name, its content)."""
    if not path.exists():
        raise BadSecrets(f"--secret-mount {path}: no such file")
    if not path.is_file():
        raise BadSecrets(f"--secret-mount {path}: not a file")
    size = path.stat().st_size
    if size > MAX_FILE:
        raise BadSecrets(f"--secret-mount {path}: {size} bytes, more than the 1 MiB allowed")
    if not FILE_NAME.fullmatch(path.name):
        raise BadSecrets(
            f"--secret-mount {path}: its name must be letters, digits, '.', '-' or '_'"
        )
    try:
        return path.name, path.read_bytes()
    except OSError as e:
        raise BadSecrets(f"--secret-mount {path}: cannot read it: {e.strerror}") from None


def gather(
    pairs: list[str] | None,
    secrets_file: Path | None,
    mounts: list[Path] | None,
    ignore_empty: bool = False,
    allow_empty: bool = False,
) -> SecretsInput:
    """Everything given, checked; `--secrets` over the file, skipping IGNORED names."""
    out = SecretsInput()
    for path in mounts or []:
        name, content = read_mount(path)
        if name in out.files:
            raise BadSecrets(f"--secret-mount: two files named {name}")
        out.files[name] = content
    if secrets_file is not None:
        from_file = read_env_file(secrets_file, allow_empty=allow_empty, ignore_empty=ignore_empty)
        out.env.update(from_file.env)
        out.skipped += from_file.skipped
    out.env.update(parse_pairs(pairs or []))
    for name in IGNORED:
        if out.env.pop(name, None) is not None:
            out.skipped.append(name)
    total = sum(len(c) for c in out.files.values())
    if total > MAX_FILES_TOTAL:
        raise BadSecrets(
            f"--secret-mount: {total} bytes of files in all; at most {MAX_FILES_TOTAL} at once"
        )
    both = sorted(set(out.env) & set(out.files))
    if both:
        raise BadSecrets(f"{', '.join(both)}: given both as a value and as a file")
    return out
