"""The Node.js builder: node_modules installed from the lockfile, cached by its digest.

A Node.js agent folder has package.json and a lockfile: package-lock.json or
npm-shrinkwrap.json (`npm ci`), pnpm-lock.yaml (`pnpm install --frozen-lockfile`) or yarn.lock
(`yarn install --frozen-lockfile`). The digest covers the lockfile, its name and the Node.js
version (native addons are built for one ABI). The install runs once per digest, in a folder of
the cache holding only package.json, the lockfile and the package manager's settings
(.npmrc, .yarnrc, .yarnrc.yml, .pnpmfile.cjs); each version's sources get a link `node_modules`
to the cached one, so a change of sources only reuses it. Then the project's own `build` script
runs in the sources (TypeScript, bundlers), when package.json has one.

As for Python environments, the install happens in a temporary folder renamed into place when
complete, under a lock per digest: a failed or concurrent build never leaves half a node_modules
in use.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import subprocess
from pathlib import Path

from voicefleet.build.local import COMPLETE, Artifact, LocalBuilder, Log
from voicefleet.errors import BuildFailed

# The lockfile of each package manager, first found wins, and its clean install.
INSTALLERS: dict[str, tuple[str, ...]] = {
    "package-lock.json": ("npm", "ci", "--no-audit", "--no-fund"),
    "npm-shrinkwrap.json": ("npm", "ci", "--no-audit", "--no-fund"),
    "pnpm-lock.yaml": ("pnpm", "install", "--frozen-lockfile"),
    "yarn.lock": ("yarn", "install", "--frozen-lockfile"),
}
SETTINGS = (".npmrc", ".yarnrc", ".yarnrc.yml", ".pnpmfile.cjs")
AGENT_FILES = ("agent.js", "agent.mjs", "agent.cjs", "index.js", "main.js")


def is_node_agent(folder: Path) -> bool:
    """A Node.js agent: package.json, and no agent.py (which makes it a Python one)."""
    return (folder / "package.json").is_file() and not (folder / "agent.py").exists()


def lockfile(folder: Path) -> str:
    return next((name for name in INSTALLERS if (folder / name).is_file()), "")


def package(folder: Path) -> dict[str, object]:
    try:
        data = json.loads((folder / "package.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else e
        raise BuildFailed(f"package.json cannot be read: {reason}") from None
    if not isinstance(data, dict):
        raise BuildFailed("package.json is not a JSON object")
    return data


def has_build_script(pkg: dict[str, object]) -> bool:
    scripts = pkg.get("scripts")
    return isinstance(scripts, dict) and isinstance(scripts.get("build"), str)


def entry(folder: Path) -> str:
    """The file `node <entry> start` runs: livekit.toml's [agent] entry, else package.json's
    main, else the first agent file there is (dist/agent.js first when there is a build
    script), else dist/agent.js or agent.js."""
    configured = _toml_entry(folder)
    if configured:
        return configured
    try:
        pkg = package(folder)
    except BuildFailed:
        pkg = {}
    main = pkg.get("main")
    if isinstance(main, str) and main.strip():
        return main.strip().removeprefix("./")
    build = has_build_script(pkg)
    names = [f"dist/{n}" for n in AGENT_FILES if build] + list(AGENT_FILES)
    found = next((n for n in names if (folder / n).is_file()), "")
    return found or ("dist/agent.js" if build else "agent.js")


def _toml_entry(folder: Path) -> str:
    import tomllib

    try:
        data = tomllib.loads((folder / "livekit.toml").read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return ""
    agent = data.get("agent")
    value = agent.get("entry") if isinstance(agent, dict) else None
    return value.strip().removeprefix("./") if isinstance(value, str) else ""


def find_node() -> str:
    found = shutil.which("node")
    if found is None:
        raise BuildFailed("node is not installed: install Node.js 20+ (with npm) on the server")
    return str(Path(found).resolve())


def node_version(node: str) -> str:
    try:
        done = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BuildFailed(f"node --version failed: {e}") from None
    if done.returncode != 0:
        raise BuildFailed(f"node --version failed: {done.stderr.strip()}")
    return done.stdout.strip()


def dependency_digest(source: Path, version: str) -> str:
    name = lockfile(source)
    h = hashlib.sha256(f"node\0{version}\0{name}\0".encode())
    try:
        h.update((source / name).read_bytes())
    except OSError as e:
        raise BuildFailed(f"{name} cannot be read ({e.strerror})") from None
    return h.hexdigest()


class NodeBuilder:
    """Builds Node.js agent folders; shares LocalBuilder's cache folder and process runner."""

    def __init__(self, cache_dir: Path, runner: LocalBuilder, node: str | None = None) -> None:
        self.cache_dir = cache_dir.absolute()
        self.runner = runner
        self.node = node

    async def build(self, source: Path, log: Log) -> Artifact:
        source = source.absolute()
        pkg = package(source)
        name = lockfile(source)
        if not name:
            raise BuildFailed(
                "package.json has no lockfile beside it (package-lock.json, pnpm-lock.yaml or "
                "yarn.lock): run `npm install` and keep the lockfile, so that the build installs "
                "exactly the versions you tested"
            )
        tool = INSTALLERS[name][0]
        if shutil.which(tool) is None:
            how = "npm comes with Node.js" if tool == "npm" else f"`corepack enable {tool}`"
            raise BuildFailed(f"{name} needs {tool}, which is not installed on the server ({how})")
        node = self.node or find_node()
        version = await asyncio.to_thread(node_version, node)
        digest = dependency_digest(source, version)
        env = self.cache_dir / f"node-{digest[:24]}"
        cached = (env / COMPLETE).exists()
        if cached:
            log(f"dependencies unchanged ({name}, node {version}, digest {digest[:12]}): "
                f"reusing node_modules from {env}")  # fmt: skip
        else:
            cached = await self._install(source, name, digest, env, log)
        self._link(source, env, log)
        if has_build_script(pkg):
            await self.runner._run([tool, "run", "build"], source, log)
        main = entry(source)
        if not (source / main).is_file():
            raise BuildFailed(
                f"the agent's entry {main} does not exist"
                + (" after the build script" if has_build_script(pkg) else "")
                + ": set package.json's main (or [agent] entry in livekit.toml)"
            )
        log(f"node agent: node {main} start")
        return Artifact(env, Path(node), digest, cached=cached)

    async def _install(self, source: Path, name: str, digest: str, env: Path, log: Log) -> bool:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with open(self.cache_dir / f"{env.name}.lock", "w") as lock:
            await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)
            if (env / COMPLETE).exists():  # installed by a concurrent build meanwhile
                log(f"dependencies unchanged (digest {digest[:12]}): reusing node_modules "
                    f"from {env}")  # fmt: skip
                return True
            for old in self.cache_dir.glob(f"{env.name}*.tmp"):
                shutil.rmtree(old, ignore_errors=True)
            tmp = env.with_name(f"{env.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
            try:
                tmp.mkdir()
                for file in ("package.json", name, *SETTINGS):
                    if (source / file).is_file():
                        shutil.copyfile(source / file, tmp / file)
                await self.runner._run(list(INSTALLERS[name]), tmp, log)
                (tmp / "node_modules").mkdir(exist_ok=True)  # no dependencies at all
                (tmp / COMPLETE).write_text(digest)
                shutil.rmtree(env, ignore_errors=True)
                tmp.rename(env)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        log(f"node_modules {digest[:12]} ready")
        return False

    @staticmethod
    def _link(source: Path, env: Path, log: Log) -> None:
        target = source / "node_modules"
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.is_dir():
            log("node_modules in the upload replaced by the lockfile's install")
            shutil.rmtree(target)
        target.symlink_to(env / "node_modules", target_is_directory=True)
