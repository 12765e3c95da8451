"""The local builder: one Python environment per dependency digest, made with uv, cached.

The digest covers what decides the installed packages, by the first of these the folder has:
uv.lock, requirements.txt, pyproject.toml (its [project] dependencies) — plus the Python
version. A version whose digest was built before reuses that environment: no install runs.
Environments are built in a temporary folder and renamed into place when complete, under a
lock per digest, so a failed or concurrent build never leaves a half environment in use.
Every path given to uv is absolute: uv runs in the version's sources, and a relative path
would build the environment in there. A folder with package.json and no agent.py is a Node.js
agent: build/node.py builds it (node_modules cached by the lockfile's digest).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import secrets
import shutil
import signal
import sys
import tomllib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from voicefleet.errors import BuildFailed

Log = Callable[[str], None]
COMPLETE = ".voicefleet-complete"


@dataclass(frozen=True)
class Artifact:
    env_dir: Path
    python: Path
    dependency_digest: str
    cached: bool


def find_uv() -> str:
    try:
        from uv import find_uv_bin

        return str(find_uv_bin())
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        if found is None:
            raise BuildFailed("uv is not installed (pip install uv)") from None
        return found


def dependency_source(source: Path) -> tuple[str, bytes]:
    """Which file decides the dependencies, and the bytes that count from it."""
    for name in ("uv.lock", "requirements.txt"):
        if (source / name).exists():
            return name, _read(source, name)
    if (source / "pyproject.toml").exists():
        try:
            text = _read(source, "pyproject.toml").decode()
            project = tomllib.loads(text).get("project", {})
        except UnicodeDecodeError:
            raise BuildFailed("pyproject.toml is not UTF-8 text") from None
        except tomllib.TOMLDecodeError as e:
            raise BuildFailed(f"pyproject.toml is not valid TOML: {e}") from None
        deps = sorted(project.get("dependencies", []))
        return "pyproject.toml", "\n".join(deps).encode()
    return "", b""


def _read(source: Path, name: str) -> bytes:
    # The sources are an upload: say which of its files is wrong, not where the server keeps it.
    try:
        return (source / name).read_bytes()
    except OSError as e:
        raise BuildFailed(f"{name} cannot be read ({e.strerror})") from None


def dependency_digest(source: Path, python_version: str) -> str:
    name, content = dependency_source(source)
    h = hashlib.sha256(f"{python_version}\0{name}\0".encode())
    h.update(content)
    return h.hexdigest()


class LocalBuilder:
    def __init__(self, cache_dir: Path, uv: str | None = None, python: str | None = None) -> None:
        self.cache_dir = cache_dir.absolute()
        self.uv = uv
        self.python = python or sys.executable
        self.python_version = ".".join(map(str, sys.version_info[:3]))

    async def build(self, source: Path, log: Log) -> Artifact:
        source = source.absolute()
        from voicefleet.build import node  # it builds on this module

        if node.is_node_agent(source):  # package.json and no agent.py
            return await node.NodeBuilder(self.cache_dir, self).build(source, log)
        digest = dependency_digest(source, self.python_version)
        env = self.cache_dir / digest[:24]
        if (env / COMPLETE).exists():
            log(f"dependencies unchanged (digest {digest[:12]}): reusing {env}")
            return Artifact(env, env / "bin" / "python", digest, cached=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with open(self.cache_dir / f"{digest[:24]}.lock", "w") as lock:
            await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)
            if (env / COMPLETE).exists():  # built by a concurrent build meanwhile
                log(f"dependencies unchanged (digest {digest[:12]}): reusing {env}")
                return Artifact(env, env / "bin" / "python", digest, cached=True)
            # A name of its own: a uv left running by a build that was cancelled (a server
            # shutdown) cannot write into this one. Such leftovers are cleared here.
            for old in self.cache_dir.glob(f"{env.name}*.tmp"):
                shutil.rmtree(old, ignore_errors=True)
            tmp = env.with_name(f"{env.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
            try:
                await self._make(source, tmp, log)
                (tmp / COMPLETE).write_text(digest)
                shutil.rmtree(env, ignore_errors=True)
                tmp.rename(env)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        log(f"environment {digest[:12]} ready")
        return Artifact(env, env / "bin" / "python", digest, cached=False)

    async def _make(self, source: Path, env: Path, log: Log) -> None:
        uv = self.uv or find_uv()
        await self._run([uv, "venv", "--python", self.python, str(env)], source, log)
        # Bytecode compiled now, not by the first instance to start: a cold start (and every
        # start where the environment is read-only) would pay for it otherwise.
        installer = [
            uv, "pip", "install", "--compile-bytecode", "--python", str(env / "bin" / "python")
        ]  # fmt: skip
        name, _ = dependency_source(source)
        if name == "uv.lock":
            requirements = env / "requirements.lock.txt"
            await self._run(
                [
                    uv,
                    "export",
                    "--frozen",
                    "--no-hashes",
                    "--no-emit-project",
                    "-o",
                    str(requirements),
                ],
                source,
                log,
            )
            await self._run([*installer, "-r", str(requirements)], source, log)
        elif name:
            await self._run([*installer, "-r", name], source, log)
        else:
            log("warning: no uv.lock, requirements.txt or pyproject.toml: no packages installed")

    async def _run(self, cmd: list[str], cwd: Path, log: Log) -> None:
        log("$ " + " ".join(Path(cmd[0]).name if i == 0 else c for i, c in enumerate(cmd)))
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            cwd=cwd,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "NO_COLOR": "1", "UV_NO_PROGRESS": "1", "VIRTUAL_ENV": ""},
            start_new_session=True,  # a group of its own: uv compiles bytecode in children
        )
        tail: deque[str] = deque(maxlen=20)
        assert proc.stdout is not None
        try:
            async for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip()
                tail.append(line)
                log(line)
            code = await proc.wait()
        except BaseException:  # cancelled (server shutdown): the tool must not run on
            # ... nor its workers, which would write into the folder being removed.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await asyncio.shield(proc.wait())
            raise
        if code != 0:
            raise BuildFailed(
                f"{Path(cmd[0]).name} {cmd[1]} failed (exit {proc.returncode}):\n" + "\n".join(tail)
            )
